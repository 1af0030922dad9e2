//! Helpers shared by the tests that run the `herald` binary or need an edited topology.
// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `herald` binary with `args`, quietly, and waits for it.
pub fn herald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("herald runs")
}

/// Everything a run printed, for assertion messages and searches.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Copies the shipped topology into `dir`, passing each file's text (by its path relative to
/// `topology/`, e.g. `journeys/abandoned_cart.toml`) through `edit`.
pub fn edited_topology(dir: &Path, edit: impl Fn(&str, String) -> String) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("topology");
    std::fs::create_dir_all(dir.join("journeys")).unwrap();
    let mut files: Vec<String> = ["topics.toml", "templates.toml", "policy.toml"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    for e in std::fs::read_dir(src.join("journeys")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        files.push(format!("journeys/{name}"));
    }
    for f in files {
        let text = std::fs::read_to_string(src.join(&f)).unwrap();
        std::fs::write(dir.join(&f), edit(&f, text)).unwrap();
    }
}
