//! Reads a topology folder from disk: the shell half of `topology`, which parses and validates
//! the texts it is given and never touches the file system itself.

use crate::topology::Topology;
use anyhow::{Context, Result};
use std::path::Path;

/// Reads `topics.toml`, `templates.toml`, `policy.toml` and `journeys/*.toml` from a directory.
pub fn load(dir: &Path) -> Result<Topology> {
    let read = |f: &Path| {
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
    };
    let journeys_dir = dir.join("journeys");
    let mut journeys = Vec::new();
    if journeys_dir.is_dir() {
        let entries = std::fs::read_dir(&journeys_dir)
            .with_context(|| format!("cannot list {}", journeys_dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                journeys.push((name, read(&path)?));
            }
        }
    }
    Topology::from_parts(
        &read(&dir.join("topics.toml"))?,
        &read(&dir.join("templates.toml"))?,
        &read(&dir.join("policy.toml"))?,
        &journeys,
    )
}
