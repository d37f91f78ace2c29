//! `ca-cli request ...`: requests awaiting a second operator (the two-person rule).

use anyhow::Result;

use super::block_on;
use crate::api::RequestView;
use crate::cli::{Output, RequestCmd, ServerArgs};
use crate::client::Api;
use crate::output::{self, emit_server};

pub fn run(cmd: RequestCmd, output: Output) -> Result<()> {
    match cmd {
        RequestCmd::List { status, server } => list(status, &server, output),
        RequestCmd::Approve { id, server } => decide(&id, "approve", "approved", &server, output),
        RequestCmd::Reject { id, server } => decide(&id, "reject", "rejected", &server, output),
    }
}

fn list(status: Option<String>, server: &ServerArgs, output: Output) -> Result<()> {
    let api = Api::new(&server.server, &server.ca_root)?;
    let path = match status {
        Some(s) => format!("/v1/requests?status={s}"),
        None => "/v1/requests".into(),
    };
    let v = block_on(api.call("GET", &path, None))?;
    emit_server(output, v, |v: &Vec<RequestView>| output::requests_text(v))
}

/// `verb` is the endpoint, `decision` how the text reports it.
fn decide(id: &str, verb: &str, decision: &str, server: &ServerArgs, output: Output) -> Result<()> {
    let api = Api::new(&server.server, &server.ca_root)?;
    let v = block_on(api.call("POST", &format!("/v1/requests/{id}/{verb}"), None))?;
    emit_server(output, v, |v: &RequestView| output::decided_text(id, decision, v))
}
