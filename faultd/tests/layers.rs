//! The daemon's layers point one way: a module may use its own layer and the layers below it,
//! never one above. Order, lowest first: `ops`, `kernel`, `engine`, `daemon`, `front`, then the
//! wiring (`lib.rs`, `main.rs`) and the operator CLI (`ctl`), which may use anything.
//!
//! The check reads the source: every `crate::<module>` path outside comments, and every
//! `super::` path that climbs out of a layer. It also refuses a module file that belongs to no
//! layer, so a new top-level module must be placed in the order before it builds.

use std::path::{Path, PathBuf};

/// Layers, lowest first; the index is the rank.
const ORDER: [&str; 5] = ["ops", "kernel", "engine", "daemon", "front"];
/// Top-level modules above every layer.
const TOP: [&str; 3] = ["lib", "main", "ctl"];

fn rank(module: &str) -> Option<usize> {
    ORDER.iter().position(|m| *m == module)
}

/// The top-level module a file under `src` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("non-empty path");
    let first = first.as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a line without its `//` comment (good enough for this crate: no `//` inside
/// string literals that also name a `crate::` path).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Every layer violation in the tree under `src`, as "file:line: what".
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in &files {
        let module = module_of(src, file);
        let own = rank(&module);
        if own.is_none() && !TOP.contains(&module.as_str()) {
            found.push(format!(
                "{}: module `{module}` is in no layer; add it to ORDER or TOP in {}",
                file.display(),
                file!()
            ));
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = code(line);
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let Some(own) = own else { continue };
                match rank(&name) {
                    Some(used) if used > own => found.push(format!(
                        "{}:{}: `{module}` uses `crate::{name}`, a layer above it",
                        file.display(),
                        n + 1
                    )),
                    Some(_) => {}
                    None if TOP.contains(&name.as_str()) => found.push(format!(
                        "{}:{}: `{module}` uses `crate::{name}`, the wiring above every layer",
                        file.display(),
                        n + 1
                    )),
                    None => {}
                }
            }
        }
    }
    found
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let found = violations(&src_dir());
    assert!(found.is_empty(), "upward imports:\n{}", found.join("\n"));
}

#[test]
fn an_upward_import_is_caught() {
    // A copy of the tree with one deliberate upward import: ops/config.rs naming the engine.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("src");
    copy_tree(&src_dir(), &copy);
    let config = copy.join("ops").join("config.rs");
    let mut text = std::fs::read_to_string(&config).expect("config.rs");
    text.push_str("\n#[allow(unused_imports)]\nuse crate::engine::FaultServer;\n");
    std::fs::write(&config, text).expect("write config.rs");
    let found = violations(&copy);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("`ops` uses `crate::engine`"), "{found:?}");
}

#[test]
fn a_module_outside_every_layer_is_caught() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("src");
    copy_tree(&src_dir(), &copy);
    std::fs::write(copy.join("stray.rs"), "pub fn f() {}\n").expect("write stray.rs");
    let found = violations(&copy);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("`stray` is in no layer"), "{found:?}");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}
