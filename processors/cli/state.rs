//! `herald state`: one customer's projected state, read from the store.

use super::args::*;
use crate::store::StoreAddress;
use crate::telemetry::{self};
use anyhow::{bail, Context, Result};
use clap::Args;

/// The arguments of `herald state`.
#[derive(Args, Debug)]
pub struct StateArgs {
    /// The customer id, as the input events carry it.
    #[arg(long)]
    customer: String,
    /// The store: a `state.redb` file or a `scylla://HOST:PORT/KEYSPACE` address.
    #[arg(long, env = "HERALD_STORE")]
    store: StoreAddress,
    #[command(flatten)]
    topology: TopologyArgs,
    #[arg(long)]
    json: bool,
}

/// Runs `herald state`.
pub fn run(args: StateArgs) -> Result<()> {
    let StateArgs {
        customer,
        store,
        topology: dir,
        json,
    } = args;
    telemetry::init_tracing("warn")?;
    let topo = dir.load()?;
    let rt = store_runtime()?;
    store.ensure_exists("--store")?;
    let store = store.open(rt.handle())?;
    let Some(view) = store.customer(&customer)? else {
        bail!(
            "{} holds no state for customer '{customer}'",
            store.describe()
        );
    };
    let state = crate::store::state_encoding::decode(&view.state)
        .with_context(|| format!("the stored state of {customer} is unreadable"))?;
    let summary = crate::projection::summarise(
        &customer,
        view.partition,
        view.next_offset,
        &state,
        store.consent_history(&customer)?,
        topo.policy.session_window_hours,
    );
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(())
}
