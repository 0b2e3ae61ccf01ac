//! The daemon's layers point one way: a module may use its own layer and the layers below it,
//! never one above. Order, lowest first: `ops`, `kernel`, `engine`, `daemon`, `front`, then the
//! wiring (`lib.rs`, `main.rs`) and the operator CLI (`ctl`), which may use anything.
//!
//! The check reads the source: every `crate::<module>` path outside comments, and every
//! `super::` path that climbs out of a layer. It also refuses a module file that belongs to no
//! layer, so a new top-level module must be placed in the order before it builds.
//!
//! Within a layer, modules must not import each other in a circle either: the check builds the
//! graph of which module file names which (`crate::` and `super::` paths, test modules left
//! out) and refuses every strongly connected set of two or more. A module's use of its own
//! children is left out of that graph: a `mod.rs` holds its parts (the engine's `FaultServer`
//! keeps a `device::Device`), and its children reach back for the type they extend.

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

/// The module path of a file under `src`: `engine/session.rs` is `engine::session`,
/// `engine/mod.rs` is `engine`, `lib.rs` and `main.rs` are the crate root (`""`).
fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned()
        })
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts.join("::")
}

/// The longest module of `known` that `path` (a `::` path) starts with.
fn resolve<'a>(known: &'a [String], path: &[&str]) -> Option<&'a String> {
    (1..=path.len())
        .rev()
        .find_map(|n| known.iter().find(|k| **k == path[..n].join("::")))
}

/// The path segments of `rest` (after `crate::` or `super::`): `a::b::C` -> `["a", "b", "C"]`.
fn segments(rest: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut s = rest;
    loop {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        if end == 0 {
            break;
        }
        out.push(&s[..end]);
        match s[end..].strip_prefix("::") {
            Some(next) => s = next,
            None => break,
        }
    }
    out
}

/// Which module names which: for every module file, the other modules its code (outside
/// comments and outside its `#[cfg(test)]` part) reaches by a `crate::` or `super::` path,
/// except its own descendants.
fn module_graph(src: &Path) -> Vec<(String, Vec<String>)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let known: Vec<String> = files.iter().map(|f| module_path(src, f)).collect();
    let mut graph = Vec::new();
    for (file, me) in files.iter().zip(&known) {
        let text = std::fs::read_to_string(file).expect("readable source");
        let parent: Vec<&str> = me.split("::").filter(|s| !s.is_empty()).collect();
        let parent = &parent[..parent.len().saturating_sub(1)];
        let mut uses: Vec<String> = Vec::new();
        for line in text.lines() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                // Test modules sit at the end of a file; what they use is not the module's.
                break;
            }
            let code = code(line);
            for (prefix, base) in [("crate::", &[][..]), ("super::", parent)] {
                let mut rest = code;
                while let Some(i) = rest.find(prefix) {
                    // `crate::` inside a longer name (`foo_crate::`) is not the crate root.
                    let boundary = rest[..i]
                        .chars()
                        .last()
                        .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
                    rest = &rest[i + prefix.len()..];
                    if !boundary {
                        continue;
                    }
                    let mut path: Vec<&str> = base.to_vec();
                    path.extend(segments(rest));
                    let Some(used) = resolve(&known, &path) else {
                        continue;
                    };
                    let descendant = me.is_empty() || used.starts_with(&format!("{me}::"));
                    if used != me && !descendant && !uses.contains(used) {
                        uses.push(used.clone());
                    }
                }
            }
        }
        graph.push((me.clone(), uses));
    }
    graph
}

/// Every circle of imports: the strongly connected sets of two or more modules, each as
/// "a -> b -> ... -> a" along edges of the graph.
fn circles(src: &Path) -> Vec<String> {
    let graph = module_graph(src);
    let index = |m: &str| graph.iter().position(|(n, _)| n == m);
    let edges: Vec<Vec<usize>> = graph
        .iter()
        .map(|(_, uses)| uses.iter().filter_map(|u| index(u)).collect())
        .collect();
    // Tarjan's strongly connected components, iteratively over an explicit stack.
    let n = edges.len();
    let (mut idx, mut low) = (vec![usize::MAX; n], vec![0; n]);
    let (mut on, mut stack, mut comps) = (vec![false; n], Vec::new(), Vec::new());
    let mut next = 0;
    for root in 0..n {
        if idx[root] != usize::MAX {
            continue;
        }
        let mut work = vec![(root, 0usize)];
        while let Some(&mut (v, ref mut e)) = work.last_mut() {
            if *e == 0 {
                idx[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on[v] = true;
            }
            if let Some(&w) = edges[v].get(*e) {
                *e += 1;
                if idx[w] == usize::MAX {
                    work.push((w, 0));
                } else if on[w] {
                    low[v] = low[v].min(idx[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(u, _)) = work.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == idx[v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comps.push(comp);
                }
            }
        }
    }
    comps
        .into_iter()
        .map(|comp| {
            // The shortest circle through the set's first member (breadth first inside it).
            let start = *comp.iter().min().expect("non-empty");
            let mut from = vec![usize::MAX; n];
            let mut queue = std::collections::VecDeque::from([start]);
            'search: while let Some(v) = queue.pop_front() {
                for &w in &edges[v] {
                    if !comp.contains(&w) {
                        continue;
                    }
                    if w == start {
                        from[start] = v;
                        break 'search;
                    }
                    if from[w] == usize::MAX {
                        from[w] = v;
                        queue.push_back(w);
                    }
                }
            }
            let mut walk = vec![start];
            let mut at = from[start];
            while at != start {
                walk.push(at);
                at = from[at];
            }
            walk.push(start);
            walk.reverse();
            let names: Vec<&str> = walk.iter().map(|&i| graph[i].0.as_str()).collect();
            let mut members: Vec<&str> = comp.iter().map(|&i| graph[i].0.as_str()).collect();
            members.sort();
            format!("{{{}}}: {}", members.join(", "), names.join(" -> "))
        })
        .collect()
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
fn no_modules_import_each_other_in_a_circle() {
    let found = circles(&src_dir());
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn an_import_circle_is_caught() {
    // A copy of the tree where the swap store names the eviction that writes to it.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("src");
    copy_tree(&src_dir(), &copy);
    let store = copy.join("engine").join("store.rs");
    let mut text = std::fs::read_to_string(&store).expect("store.rs");
    text.insert_str(0, "#[allow(unused_imports)]\nuse super::evict;\n");
    std::fs::write(&store, text).expect("write store.rs");
    let planted = |c: &String| c.contains("engine::evict") && c.contains("engine::store");
    assert!(!circles(&src_dir()).iter().any(planted));
    let found = circles(&copy);
    assert!(found.iter().any(planted), "{found:?}");
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
