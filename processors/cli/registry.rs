//! `herald registry`: Herald's own schema registry subset, for local development.

use crate::telemetry::{self};
use anyhow::Result;
use std::net::SocketAddr;

/// `herald registry`: the schema registry subset, until Ctrl-C.
pub fn run(listen: SocketAddr) -> Result<()> {
    telemetry::init_tracing("info")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let addr = crate::registry::serve(listen).await?;
        println!("listening on http://{addr}");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
