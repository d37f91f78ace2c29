//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas are safe: only
//! the holder writes. The holder renews every third of the lease duration; another replica
//! takes over once `renewTime + leaseDurationSeconds` has passed. Every write to the Lease is
//! conditional on the resourceVersion read, so two candidates cannot both win.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::status::Status;

pub const LEASE_NAME: &str = "ca-agent";

pub struct Election {
    pub api: Api<Lease>,
    pub identity: String,
    pub duration: Duration,
}

impl Election {
    pub fn new(client: Client, namespace: &str, identity: String, duration: Duration) -> Election {
        Election { api: Api::namespaced(client, namespace), identity, duration }
    }

    /// Campaigns forever, publishing whether this replica leads.
    pub async fn run(self, leading: watch::Sender<bool>, status: Arc<Status>) {
        let mut last_renewed: Option<Instant> = None;
        loop {
            let result = self.try_lead().await;
            let now_leading = match result {
                Ok(held) => {
                    status.api_ok();
                    if held {
                        last_renewed = Some(Instant::now());
                    }
                    held
                }
                Err(e) => {
                    status.error(crate::k8s::cause(&e));
                    tracing::warn!(error = %e, "could not read or renew the Lease");
                    // Without a renewal we stop acting before another replica may take over.
                    last_renewed.is_some_and(|t| t.elapsed() < self.duration * 2 / 3)
                }
            };
            if !now_leading {
                last_renewed = None;
            }
            if *leading.borrow() != now_leading {
                tracing::info!(identity = %self.identity, leading = now_leading, "leadership changed");
            }
            leading.send_replace(now_leading);
            status.set_leader(now_leading);
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// One round: create, renew or take over the Lease. True when this replica holds it.
    async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX).max(1);
        let Some(current) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(LEASE_NAME.into()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another replica created it first.
                Err(e) if crate::k8s::status(&e) == Some(409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
        let expired = spec.renew_time.as_ref().is_none_or(|t| t.0.as_second() + held_for < now.as_second());
        if !mine && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let mut next = current.clone();
        let mut s = spec;
        if !mine {
            s.holder_identity = Some(self.identity.clone());
            s.acquire_time = Some(MicroTime(now));
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        }
        s.renew_time = Some(MicroTime(now));
        s.lease_duration_seconds = Some(secs);
        next.spec = Some(s);
        // `next` carries the resourceVersion read above: a concurrent change makes this a 409.
        match self.api.replace(LEASE_NAME, &PostParams::default(), &next).await {
            Ok(_) => Ok(true),
            Err(e) if crate::k8s::status(&e) == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
