//! Build facts for `faultd_build_info` (see `ops::metrics`): the git commit of the tree and
//! the rustc that compiles it, as compile-time environment variables.

use std::path::Path;
use std::process::Command;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let run = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(&dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = run("git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FAULTD_GIT_COMMIT={commit}");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = run(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FAULTD_RUSTC_VERSION={version}");

    // Build again when HEAD moves: HEAD itself (a checkout), the branch it names (a commit),
    // packed refs. Only files that exist: cargo reruns the script every time for a missing one.
    println!("cargo:rerun-if-changed=build.rs");
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watch.extend(run("git", &["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(path) = run(
            "git",
            &["rev-parse", "--path-format=absolute", "--git-path", &name],
        ) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
