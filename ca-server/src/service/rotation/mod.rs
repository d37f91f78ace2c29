//! Staged rotations: root, environment intermediate and cluster intermediate.
//!
//! What a stage means (which roots bundles carry, whether chains go through the new issuer,
//! when a stage may be left) is `ca_core::rotation`; a rotation as stored (its plan) is
//! `rotation_record`, which lower services read. This module turns the stage into the issuers every request reads (`derive`), gathers each
//! cluster's progress for the gates (`gate`), makes a rotation's plan when one is asked for
//! (`plan`) and moves its stage (`stage`). Every stage change is an approval request that a
//! second operator approves; the gate is checked when it is asked for and again, inside the
//! approving transaction, when it is approved.
//!
//! Issuers are derived, never edited: `refresh` computes each environment's certificate, key,
//! trust bundle and still-accepted predecessor from the configuration (as read at start) and
//! the rotations that started from it, and swaps the issuer when that differs. Every replica
//! does this on each background round, and the approving replica at once.

mod derive;
mod gate;
mod plan;
mod stage;

pub use derive::{refresh, refresh_quietly};
pub use gate::{ClusterStatus, gate};
pub use plan::{StartInput, StartRequest, add_certificate, start};
pub use stage::{AfterCommit, StageRequest, after_commit, approve_stage, approve_start, request_move, update_gauges};
