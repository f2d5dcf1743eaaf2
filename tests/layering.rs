//! The module layering stays a tree: no module of `src/` (nor of
//! `localnet/src/` or the simulator's `sim/src/`) imports one that imports
//! it back, directly or through others, and no file of a module of `src/`
//! or `sim/src/` a sibling that imports it back; the ledger, durable writes and localnet's wire types sit at the bottom and
//! import nothing of their crate; no source file grows past 700 lines, and
//! no function of `src/` past 120 (a longer one hides a decision). Reads the sources as text
//! (every `crate::name` path, in `use` lines and inline), so a circle fails
//! here with the modules that form it, before a reader has to untangle it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Top-level module name -> the files that make it up.
fn modules(src: &Path) -> anyhow::Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).context("reading src/")? {
        let path = entry?.path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .context("file name")?
            .to_string();
        if path.is_dir() && name == "bin" {
            continue; // Binaries: crates of their own, on top of the library.
        }
        if path.is_dir() {
            let mut files = Vec::new();
            let mut stack = vec![path.clone()];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir)? {
                    let p = e?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        files.push(p);
                    }
                }
            }
            out.entry(name).or_default().extend(files);
        } else if path.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            out.entry(name).or_default().push(path);
        }
    }
    Ok(out)
}

/// Every top-level module named after `crate::` in `text`, outside
/// comments (a doc link is not an import), including the members of a
/// grouped `use crate::{a, b::c}`.
fn references(text: &str) -> BTreeSet<String> {
    names_after(text, "crate::")
}

/// Every name that follows `prefix` in `text`, outside comments,
/// including the members of a grouped `prefix{a, b::c}`.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    let text = code.as_str();
    let mut refs = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices(prefix) {
        let rest = &text[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    refs.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// A cycle in `graph`, as the list of modules that form it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|p| p == node) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// The import graph of the crate whose sources are in `src`.
fn graph(src: &Path) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mods = modules(src)?;
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, files) in &mods {
        let mut deps = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
            deps.extend(references(&text));
        }
        deps.remove(name);
        deps.retain(|d| mods.contains_key(d));
        graph.insert(name.clone(), deps);
    }
    Ok(graph)
}

fn assert_tree(graph: &BTreeMap<String, BTreeSet<String>>) -> anyhow::Result<()> {
    if let Some(cycle) = find_cycle(graph) {
        anyhow::bail!(
            "modules import each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
    Ok(())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_module_imports_one_that_imports_it_back() -> anyhow::Result<()> {
    let graph = graph(&root().join("src"))?;
    // The checker must see the edges it is meant to police.
    assert!(
        graph.get("coordinator").is_some_and(|d| d.contains("node")),
        "the test found no edge coordinator -> node: {graph:?}"
    );
    assert_tree(&graph)
}

/// The files of each directory module of `src` (its `mod.rs` aside: the
/// module's face, as `lib.rs` is the crate's), each with the siblings it
/// names (`super::x`, `crate::<module>::x`).
fn inner_graphs(
    src: &Path,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, BTreeSet<String>>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src)? {
        let dir = entry?.path();
        let module = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !dir.is_dir() || module == "bin" {
            continue;
        }
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let name = p
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if p.extension().is_some_and(|x| x == "rs") && name != "mod" {
                files.insert(name, std::fs::read_to_string(&p)?);
            }
        }
        let mut graph = BTreeMap::new();
        for (name, text) in &files {
            let mut deps = names_after(text, "super::");
            deps.extend(names_after(text, &format!("crate::{module}::")));
            deps.remove(name);
            deps.retain(|d| files.contains_key(d));
            graph.insert(name.clone(), deps);
        }
        out.insert(module, graph);
    }
    Ok(out)
}

#[test]
fn no_file_imports_a_sibling_that_imports_it_back() -> anyhow::Result<()> {
    let graphs = inner_graphs(&root().join("src"))?;
    anyhow::ensure!(
        graphs["raft"]
            .get("store")
            .is_some_and(|d| d.contains("logfile")),
        "the test found no edge raft/store -> raft/logfile: {:?}",
        graphs["raft"]
    );
    for (module, graph) in &graphs {
        assert_tree(graph).with_context(|| format!("inside src/{module}/"))?;
    }
    Ok(())
}

#[test]
fn localnet_modules_form_a_tree_too() -> anyhow::Result<()> {
    let graph = graph(&root().join("localnet/src"))?;
    assert!(
        graph.get("chain").is_some_and(|d| d.contains("wire")),
        "the test found no edge chain -> wire: {graph:?}"
    );
    assert_tree(&graph)
}

#[test]
fn the_simulators_modules_form_a_tree_too() -> anyhow::Result<()> {
    let src = root().join("sim/src");
    let graph = graph(&src)?;
    assert!(
        graph.get("world").is_some_and(|d| d.contains("node")),
        "the test found no edge world -> node: {graph:?}"
    );
    assert_tree(&graph).context("in sim/src/")?;
    for (module, graph) in &inner_graphs(&src)? {
        assert_tree(graph).with_context(|| format!("inside sim/src/{module}/"))?;
    }
    Ok(())
}

/// The checker on a crate written to disk: a circle between two files of
/// its top level, and one between two files inside a module, each found.
#[test]
fn the_checker_finds_a_circle_in_the_files_of_a_crate() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("m"))?;
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text);
    write("lib.rs", "pub mod a;\npub mod b;\npub mod m;\n")?;
    write("a.rs", "use crate::b::B;\n")?;
    write("b.rs", "pub struct B;\nfn f() { crate::m::go() }\n")?;
    write("m.rs", "mod x;\nmod y;\npub fn go() {}\n")?;
    write("m/x.rs", "use super::y::Y;\npub struct X;\n")?;
    write("m/y.rs", "pub struct Y;\n")?;
    assert_tree(&graph(&dir)?)?;
    assert_tree(&inner_graphs(&dir)?["m"])?;
    write("m.rs", "mod x;\nmod y;\npub fn go() { crate::a::f() }\n")?;
    write("m/y.rs", "pub struct Y(crate::m::x::X);\n")?;
    let top = assert_tree(&graph(&dir)?);
    let inner = assert_tree(&inner_graphs(&dir)?["m"]);
    std::fs::remove_dir_all(&dir)?;
    anyhow::ensure!(top.is_err(), "a -> b -> m -> a was not seen");
    anyhow::ensure!(inner.is_err(), "m/x -> m/y -> m/x was not seen");
    Ok(())
}

#[test]
fn the_bottom_modules_import_nothing_of_their_crate() -> anyhow::Result<()> {
    for (src, bottom) in [
        ("src", "ledger"),
        ("src", "durable"),
        ("src", "plant"),
        ("localnet/src", "wire"),
    ] {
        let graph = graph(&root().join(src))?;
        let deps = graph
            .get(bottom)
            .with_context(|| format!("no module {bottom} in {src}"))?;
        anyhow::ensure!(deps.is_empty(), "{src}/{bottom} imports {deps:?}");
    }
    Ok(())
}

/// Every `.rs` file below the repository's `dirs` (where they exist).
fn rust_files(dirs: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| root().join(d)).collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    Ok(files)
}

#[test]
fn no_source_file_is_over_700_lines() -> anyhow::Result<()> {
    let mut long = Vec::new();
    let dirs = [
        "src",
        "tests",
        "localnet/src",
        "localnet/tests",
        "examples",
        "sim/src",
    ];
    for p in rust_files(&dirs)? {
        let lines = std::fs::read_to_string(&p)?.lines().count();
        if lines > 700 {
            long.push(format!("{} ({lines} lines)", p.display()));
        }
    }
    anyhow::ensure!(long.is_empty(), "split these by topic: {long:?}");
    Ok(())
}

/// The functions of `text` longer than `limit` lines, as (name, lines):
/// a function runs from its `fn` line to the line that closes it at the
/// same indentation (rustfmt's layout).
fn long_functions(text: &str, limit: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let code = line.trim_start();
        let indent = line.len() - code.len();
        let after_fn = [
            "pub ",
            "pub(crate) ",
            "pub(super) ",
            "async ",
            "unsafe ",
            "const ",
        ]
        .iter()
        .fold(code, |c, p| c.strip_prefix(p).unwrap_or(c));
        let Some(rest) = after_fn.strip_prefix("fn ") else {
            i += 1;
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // Its body opens on the first line ending in `{` (a declaration
        // ending in `;` has none).
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            break;
        };
        if lines[open].trim_end().ends_with(';') {
            i = open + 1;
            continue;
        }
        let close = (open + 1..lines.len()).find(|&j| {
            let l = lines[j];
            l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('}')
        });
        let end = close.unwrap_or(lines.len() - 1);
        if end - i + 1 > limit {
            long.push((name, end - i + 1));
        }
        i = open + 1;
    }
    long
}

#[test]
fn no_function_of_src_is_over_120_lines() -> anyhow::Result<()> {
    let mut long = Vec::new();
    for p in rust_files(&["src"])? {
        for (name, n) in long_functions(&std::fs::read_to_string(&p)?, 120) {
            long.push(format!("{}: {name} ({n} lines)", p.display()));
        }
    }
    anyhow::ensure!(
        long.is_empty(),
        "split these into named steps or decisions: {long:?}"
    );
    Ok(())
}

#[test]
fn the_function_checker_counts_a_function_to_its_closing_brace() {
    let body = "    x();\n".repeat(5);
    let text = format!(
        "fn short() {{\n    y();\n}}\n\nimpl A {{\n    pub async fn long(\n        a: u8,\n    ) -> u8 {{\n{body}        if a {{\n        }}\n    }}\n    fn decl();\n}}\n"
    );
    assert_eq!(long_functions(&text, 3), vec![("long".to_string(), 11)]);
    assert!(long_functions(&text, 11).is_empty());
}

#[test]
fn the_checker_sees_a_circle_when_there_is_one() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), references("use crate::{b, c::X};"));
    g.insert(
        "b".into(),
        references("/// see [`crate::c`]\nfn f() { crate::a::go() }"),
    );
    g.insert("c".into(), BTreeSet::new());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
    assert!(!g["b"].contains("c"), "a doc link counted as an import");
    let siblings = names_after(
        "use super::{flush::Job, values};\nfn f() { crate::raft::store::open() }",
        "super::",
    );
    assert_eq!(siblings, ["flush", "values"].map(String::from).into());
    g.insert("b".into(), BTreeSet::new());
    assert_eq!(find_cycle(&g), None);
}
