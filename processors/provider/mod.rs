//! The providers: one adapter per channel, each holding its client, its webhook signature and
//! body shape, and its simulator endpoint (`whatsapp`, `sms`, `email`); what an adapter is
//! (`adapter`); what a webhook says once read (`callback`); and the simulator that serves all
//! three (`simulated` state, `simulator` server).

pub mod adapter;
pub mod callback;
pub mod email;
pub mod simulated;
pub mod simulator;
pub mod sms;
pub mod whatsapp;

pub use adapter::*;
pub use simulated::{SimulatedSend, SimulatorLog, SimulatorOptions};
pub use simulator::serve_simulator_with;
