//! The server configuration (`ca_server::config::Config::from_toml_str`, the body of
//! `Config::load`): TOML, environment overrides, path resolution and validation.
//!
//! Input: the TOML text, optionally followed by a NUL byte and `KEY=VALUE` lines taken as the
//! environment (so `CA_SERVER_*` overrides are fuzzed too).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let vars: Vec<(String, String)> =
        env.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let _ = ca_server::config::Config::from_toml_str(toml, Path::new("/etc/ca-server/config.toml"), vars.into_iter());
});
