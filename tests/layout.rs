//! The layout the README and both `lib.rs` describe, held: no two modules import each other
//! (directly or round a circle), and the core crate depends on nothing that does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir` as (module path, source without its unit-test module).
fn modules(dir: &Path, skip: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if Some(path.file_name().unwrap().to_str().unwrap()) != skip {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel: PathBuf = path.strip_prefix(dir).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let source = std::fs::read_to_string(&path).unwrap();
            // A unit-test module is a leaf of its own that nothing imports.
            let test_module = [
                "#[cfg(test)]\nmod tests",
                "#[cfg(test)]\npub(crate) mod tests",
            ]
            .iter()
            .filter_map(|m| source.find(m))
            .min();
            let source = match test_module {
                Some(at) => source[..at].to_string(),
                None => source,
            };
            out.insert(parts.join("::"), source);
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(names: &BTreeSet<String>, parts: &[&str]) -> Option<String> {
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|c| names.contains(c))
}

/// Which modules each module imports, by `crate::` and `super::` paths.
fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let path_after = |src: &str, prefix: &str| -> Vec<Vec<String>> {
        src.match_indices(prefix)
            .map(|(at, _)| {
                src[at + prefix.len()..]
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap_or("")
                    .split("::")
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    };
    mods.iter()
        .map(|(m, src)| {
            let mut deps = BTreeSet::new();
            for parts in path_after(src, "crate::") {
                let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                deps.extend(resolve(&names, &parts));
            }
            let parent: Vec<&str> = m.split("::").collect();
            let parent = &parent[..parent.len().saturating_sub(1)];
            for parts in path_after(src, "super::") {
                let mut full: Vec<&str> = parent.to_vec();
                full.extend(parts.iter().map(String::as_str));
                deps.extend(resolve(&names, &full));
            }
            // A folder's facade depends on what it re-exports.
            for line in src.lines() {
                if let Some(rest) = line.strip_prefix("pub use ") {
                    let child = rest.split("::").next().unwrap_or("");
                    let full = if m.is_empty() {
                        child.to_string()
                    } else {
                        format!("{m}::{child}")
                    };
                    if names.contains(&full) {
                        deps.insert(full);
                    }
                }
            }
            deps.remove(m);
            (m.clone(), deps)
        })
        .collect()
}

/// A circle of imports, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut c = path[at..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut done, &mut Vec::new()))
}

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn no_two_modules_import_each_other_in_either_crate() {
    let core = imports(&modules(&Path::new(ROOT).join("processors/core/src"), None));
    assert!(core.contains_key("policy::status") && core.contains_key("dispatch::answer"));
    assert_eq!(circle(&core), None, "an import circle in the core");
    let shells = imports(&modules(&Path::new(ROOT).join("processors"), Some("core")));
    assert!(shells.contains_key("stages::dispatch") && shells.contains_key("provider::sms"));
    assert_eq!(circle(&shells), None, "an import circle in the shells");
}

#[test]
fn the_circle_check_finds_a_circle() {
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(
        circle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

#[test]
fn the_core_depends_only_on_crates_that_cannot_do_io() {
    let manifest: toml::Table =
        std::fs::read_to_string(Path::new(ROOT).join("processors/core/Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let allowed = [
        "anyhow",
        "hmac",
        "jiff",
        // A sorted-vector map, no_std with only `alloc` on: it holds data and nothing else.
        "litemap",
        "serde",
        "serde_json",
        "sha2",
        "thiserror",
        "toml",
    ];
    let deps = manifest["dependencies"].as_table().unwrap();
    let foreign: Vec<&String> = deps
        .keys()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(foreign.is_empty(), "the core may not depend on {foreign:?}");
    assert!(
        manifest.get("dev-dependencies").is_none() && manifest.get("build-dependencies").is_none(),
        "the core has no build script and no test-only crates"
    );
}
