//! The README's configuration reference names every setting each command reads from the
//! environment, with that command: a new flag without its row fails here.

use std::collections::BTreeSet;

const COMMANDS: &[&str] = &[
    "run",
    "gateway",
    "demo",
    "bench",
    "chaos",
    "rebuild",
    "state",
    "replay",
    "export",
    "dlq list",
    "dlq replay",
    "audit consent",
    "audit verify",
    "topics apply",
    "schemas register",
    "registry",
    "simulator",
];

/// The environment variables `herald COMMAND --help` lists.
fn env_names(command: &str) -> BTreeSet<String> {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(command.split(' '))
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success(), "herald {command} --help");
    String::from_utf8_lossy(&o.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_configuration_reference_lists_every_variable_with_its_commands() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- config-reference:start -->")
        .expect("the reference's start marker");
    let end = readme
        .find("<!-- config-reference:end -->")
        .expect("the reference's end marker");
    let rows: Vec<&str> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .collect();
    let mut missing = Vec::new();
    for command in COMMANDS {
        for name in env_names(command) {
            let listed = rows.iter().any(|r| {
                r.contains(&format!("| `{name}` |")) && r.contains(&format!("`{command}`"))
            });
            if !listed {
                missing.push(format!("{name} ({command})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the README's configuration reference (scripts/config-reference --write README.md): {missing:?}"
    );
    assert!(rows.len() > 50, "{} rows", rows.len());
}
