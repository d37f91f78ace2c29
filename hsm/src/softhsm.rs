//! SoftHSM2 helpers for throwaway tokens (quickstart, dev mode, tests).
//!
//! Tokens are initialised through PKCS#11 itself (`C_InitToken`, `C_InitPIN`) rather than
//! `softhsm2-util`, whose `--pin` flag would put the PIN in argv.

use std::path::{Path, PathBuf};

use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::error::{HsmError, Result};
use crate::pkcs11::{find_slot, login_error, module};

/// Where distributions install the SoftHSM2 module.
const CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 module: `SOFTHSM2_MODULE` if set, else the first installed candidate.
pub fn find_module() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Writes a SoftHSM2 config whose tokens live in `dir/tokens` and returns its path.
/// The caller must point `SOFTHSM2_CONF` at it before the module is first loaded.
pub fn write_config(dir: &Path) -> Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| HsmError::io(&tokens, e))?;
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&conf, text).map_err(|e| HsmError::io(&conf, e))?;
    Ok(conf)
}

/// Initialises a new token labelled `label` in the first free slot and sets its user PIN.
pub fn init_token(module_path: &Path, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<()> {
    // Two initialisations racing would pick the same free slot.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    let ctx = module(module_path)?;
    if find_slot(&ctx, module_path, label).is_ok() {
        return Err(HsmError::LabelExists { token: label.to_string(), object: "(token)".into() });
    }
    let dev = |f: &str, e: cryptoki::error::Error| HsmError::Device {
        token: label.to_string(),
        function: f.to_string(),
        rv: e.to_string(),
    };
    let slots = ctx.get_slots_with_token().map_err(|e| dev("C_GetSlotList", e))?;
    let free = slots
        .into_iter()
        .find(|s| ctx.get_token_info(*s).map(|i| !i.token_initialized()).unwrap_or(false))
        .ok_or_else(|| HsmError::TokenNotFound { label: "(a free slot)".into(), module: module_path.to_path_buf() })?;
    ctx.init_token(free, so_pin, label).map_err(|e| dev("C_InitToken", e))?;
    // SoftHSM renumbers slots after C_InitToken: find ours again by label.
    let slot = find_slot(&ctx, module_path, label)?;
    let session = ctx.open_rw_session(slot).map_err(|e| dev("C_OpenSession", e))?;
    session.login(UserType::So, Some(so_pin)).map_err(|e| login_error(label, e))?;
    session.init_pin(user_pin).map_err(|e| dev("C_InitPIN", e))?;
    session.logout().map_err(|e| dev("C_Logout", e))?;
    Ok(())
}

/// Points this process at a SoftHSM2 config. Must run before any PKCS#11 module is loaded and
/// while the process is still single-threaded (at the start of `main`, or in a test binary
/// that runs one test per process).
#[allow(unsafe_code)]
pub fn use_config(conf: &Path) {
    // SAFETY: callers run this before spawning threads; nothing reads the environment
    // concurrently at that point.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

/// A fresh random PIN for a throwaway token (32 hex characters).
pub fn random_pin() -> Result<SecretString> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| HsmError::KeyFormat("system RNG failed".into()))?;
    Ok(SecretString::from(hex::encode(b)))
}
