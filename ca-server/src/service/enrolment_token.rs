//! One-time enrolment tokens: made when a registration or a re-enrolment is requested, stored
//! only as a hash, spent by a plug-in cluster's first intermediate or an agent's first
//! certificate. A leaf, so that the services that make and those that spend them do not
//! import each other.

use base64::Engine;
use sha2::Digest;

/// What is stored and compared: the token's SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// 256 random bits; the `pet_` prefix makes leaked tokens easy to spot in scanners.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    format!("pet_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}
