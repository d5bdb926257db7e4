//! The kmm-rs operator as a library: the reconcilers (and everything the `kmm-operator` binary
//! runs), so that tests can drive them against a real API server.

pub mod controllers;

pub mod admin;
pub mod config;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod run;
pub mod shutdown;
pub mod tls;
pub mod webhook;
