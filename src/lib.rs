//! meetgate: an authenticating reverse proxy for the Huawei Cloud Meeting REST API.

pub mod simulator;
pub mod token;
