//! The documentation names code that exists: every `path::item` that
//! README.md or a page of docs/ writes in backticks resolves, read as text,
//! in keyraft (`src/`), localnet, the simulator (`sim/src/`) or a test
//! binary (`tests/NAME.rs`). A renamed function or a moved module fails
//! here, naming the page and the path, instead of leaving the docs
//! pointing at nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Crates that are not ours: a path into one is not checked.
const EXTERNAL: [&str; 9] = [
    "std", "tokio", "openraft", "tonic", "serde", "clap", "prost", "sled", "cryptoki",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where a path may start: a crate's root file and the dir of its modules.
fn crate_roots() -> Vec<(PathBuf, PathBuf)> {
    let r = root();
    vec![
        (r.join("src/lib.rs"), r.join("src")),
        (r.join("localnet/src/lib.rs"), r.join("localnet/src")),
        (r.join("sim/src/lib.rs"), r.join("sim/src")),
        // A test binary is a crate of one file.
        (PathBuf::new(), r.join("tests")),
    ]
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// The paths one backticked span names: `a::b`, `a::b()`, or
/// `a::{b, c}` (two paths); nothing when the span is no path.
fn paths_in(span: &str) -> Vec<Vec<String>> {
    let span = span.strip_suffix("()").unwrap_or(span);
    let span = span.strip_prefix("keyraft::").unwrap_or(span);
    let (stem, group) = match span.split_once("::{") {
        Some((stem, rest)) => match rest.strip_suffix('}') {
            Some(g) => (stem, Some(g)),
            None => return vec![],
        },
        None => (span, None),
    };
    let stem: Vec<String> = stem.split("::").map(str::to_string).collect();
    if !stem.iter().all(|s| is_ident(s)) || (group.is_none() && stem.len() < 2) {
        return vec![];
    }
    if EXTERNAL.contains(&stem[0].as_str()) {
        return vec![];
    }
    match group {
        None => vec![stem],
        Some(g) => g
            .split(',')
            .map(str::trim)
            .filter(|s| is_ident(s))
            .map(|s| {
                let mut p = stem.clone();
                p.push(s.to_string());
                p
            })
            .collect(),
    }
}

/// Every backticked span of a markdown text, outside fenced code blocks.
fn spans(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(inside), Some(_)) = (parts.next(), parts.next()) {
            out.push(inside.to_string());
        }
    }
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Whether `text` defines `name` as an item (or re-exports it).
fn defines(text: &str, name: &str) -> bool {
    const KINDS: [&str; 9] = [
        "fn",
        "struct",
        "enum",
        "trait",
        "type",
        "const",
        "static",
        "mod",
        "macro_rules!",
    ];
    text.lines().any(|l| {
        let words: Vec<&str> = l
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '!'))
            .filter(|w| !w.is_empty())
            .collect();
        let kind_then_name = words
            .windows(2)
            .any(|w| KINDS.contains(&w[0]) && w[1] == name);
        let reexport = l.trim_start().starts_with("pub use") && words.contains(&name);
        // A type a macro declares (`declare_raft_types!(pub TypeConfig: ...)`).
        let declared = name.starts_with(|c: char| c.is_ascii_uppercase())
            && l.trim_start()
                .strip_prefix("pub ")
                .and_then(|r| r.strip_prefix(name))
                == Some(":");
        kind_then_name || reexport || declared
    })
}

/// Whether `name`, following an item, is a method, variant or field of
/// it somewhere in the crate: `fn name`, or a line that starts with it.
fn member(sources: &[String], name: &str) -> bool {
    sources.iter().any(|text| {
        defines(text, name)
            || text.lines().any(|l| {
                let l = l.trim_start().trim_start_matches("pub ");
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([',', '(', '{', ':', ' ']))
            })
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether `path` resolves in the crate rooted at (`file`, `dir`).
fn resolves_in(file: &Path, dir: &Path, path: &[String], sources: &[String]) -> bool {
    let (mut file, mut dir) = (file.to_path_buf(), dir.to_path_buf());
    let mut rest = path;
    // Down the modules the path names.
    while let Some((seg, tail)) = rest.split_first() {
        let (flat, nested) = (dir.join(format!("{seg}.rs")), dir.join(seg).join("mod.rs"));
        let next = [flat, nested].into_iter().find(|p| p.is_file());
        match next {
            Some(f) if !tail.is_empty() || file.as_os_str().is_empty() => {
                file = f;
                dir = dir.join(seg);
                rest = tail;
            }
            // The last segment is a module: it exists.
            Some(_) => return true,
            None => break,
        }
    }
    let Some((item, members)) = rest.split_first() else {
        return true;
    };
    defines(&read(&file), item) && members.iter().all(|m| member(sources, m))
}

/// Our crates: each one's root file, module dir and every source text.
struct Crates(Vec<(PathBuf, PathBuf, Vec<String>)>);

impl Crates {
    fn read() -> Crates {
        Crates(
            crate_roots()
                .into_iter()
                .map(|(file, dir)| {
                    let mut files = Vec::new();
                    rust_files(&dir, &mut files);
                    let sources = files.iter().map(|f| read(f)).collect();
                    (file, dir, sources)
                })
                .collect(),
        )
    }

    /// Whether `path` names code that exists in any of them.
    fn resolve(&self, path: &[String]) -> bool {
        self.0.iter().any(|(file, dir, sources)| {
            // A path that starts at a type (`Signer::sign_here`).
            if path[0].starts_with(|c: char| c.is_ascii_uppercase()) {
                return sources.iter().any(|t| defines(t, &path[0]))
                    && path[1..].iter().all(|m| member(sources, m));
            }
            resolves_in(file, dir, path, sources)
        })
    }
}

fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

#[test]
fn every_path_the_docs_name_exists() {
    let crates = Crates::read();
    let mut missing = BTreeSet::new();
    let mut checked = 0;
    for page in pages() {
        for span in spans(&read(&page)) {
            for path in paths_in(&span) {
                checked += 1;
                if !crates.resolve(&path) {
                    let name = page.strip_prefix(root()).unwrap_or(&page).display();
                    missing.insert(format!("{name}: `{}`", path.join("::")));
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} paths found: is the reader broken?"
    );
    assert!(
        missing.is_empty(),
        "the docs name code that does not exist:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The checker itself: it finds what exists, in each crate and test
/// binary, and refuses what does not.
#[test]
fn the_path_checker_tells_real_paths_from_made_up_ones() {
    let crates = Crates::read();
    let p = |s: &str| paths_in(s);
    assert_eq!(p("x"), Vec::<Vec<String>>::new());
    assert_eq!(p("raft::network::{Stamp, Transport}").len(), 2);
    assert!(p("std::fs::read").is_empty(), "external crates are skipped");
    for real in [
        "raft::network::Transport",
        "raft::network::{after_append, caught}",
        "coordinator::policy",
        "config::RunArgs::resolve",
        "Remembered::see",
        "keyraft::raft::store::open_on",
        "harness::eventually",
        "layering::the_checker_sees_a_circle_when_there_is_one",
    ] {
        for path in p(real) {
            assert!(crates.resolve(&path), "{real} should resolve");
        }
    }
    for made_up in [
        "raft::network::NoSuchThing",
        "raft::nowhere::Transport",
        "Remembered::no_such_method",
        "NoSuchType::new",
        "signer::before_commit",
    ] {
        let paths = p(made_up);
        assert!(!paths.is_empty(), "{made_up} is a path");
        assert!(
            paths.iter().any(|path| !crates.resolve(path)),
            "{made_up} should not resolve"
        );
    }
    let text = "a `raft::Gate` here\n```\n`not::read`\n```\nand `b::c()`";
    assert_eq!(spans(text), vec!["raft::Gate", "b::c()"]);
}
