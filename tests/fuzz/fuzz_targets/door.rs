//! One fuzz target for every door: `HERALD_DOOR` names which (`scripts/fuzz` sets it), so the
//! doors share one instrumented build instead of eight.
#![no_main]

use herald::doors::Door;
use std::sync::OnceLock;

fn door() -> Door {
    static DOOR: OnceLock<Door> = OnceLock::new();
    *DOOR.get_or_init(|| {
        let name = std::env::var("HERALD_DOOR").unwrap_or_default();
        Door::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = Door::ALL.iter().map(|d| d.name()).collect();
                panic!("HERALD_DOOR must be one of {names:?}, not '{name}'")
            })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(broken) = door().open(data) {
        panic!("{broken}");
    }
});
