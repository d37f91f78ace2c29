//! PKCS#11 custody through `cryptoki`.
//!
//! A module is loaded and initialised once per process (a second `C_Initialize`, or a
//! `C_Finalize` from a dropped context, would break every other user of it), and each token is
//! logged in once: PKCS#11 login state belongs to the application, shared by all its sessions.
//! Sessions are `Send` but not `Sync`, so signers borrow one from a per-token pool for each
//! operation; that is what makes concurrent signing safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use sha2::Digest;

use crate::error::{HsmError, Result};
use crate::keyref::{PinSource, Pkcs11Ref};
use crate::public::{KeyAlgorithm, OID_P256, OID_P384, PublicKey, PublicKeyKind};

fn modules() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    static M: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// Logged-in tokens by (module path, token label).
type Tokens = Mutex<HashMap<(PathBuf, String), Arc<Token>>>;

fn tokens() -> &'static Tokens {
    static T: OnceLock<Tokens> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// The sessions of one logged-in token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStats {
    pub token: String,
    /// Sessions open. The pool opens one only when every open one is in use and never closes
    /// a live one, so this is also the most that were ever in use at once.
    pub open: usize,
    /// Sessions in use now.
    pub in_use: usize,
}

/// The session pools of every token this process has logged in to.
pub fn session_stats() -> Vec<SessionStats> {
    let tokens: Vec<Arc<Token>> = tokens().lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
    tokens
        .iter()
        .map(|t| {
            let pool = t.pool.lock().unwrap_or_else(|p| p.into_inner());
            SessionStats { token: t.label.clone(), open: pool.open, in_use: pool.open - pool.idle.len() }
        })
        .collect()
}

/// Loads and initialises a module once per process.
pub(crate) fn module(path: &Path) -> Result<Pkcs11> {
    let mut map = modules().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = map.get(path) {
        return Ok(ctx.clone());
    }
    if !path.exists() {
        return Err(HsmError::ModuleNotFound { path: path.to_path_buf() });
    }
    let ctx =
        Pkcs11::new(path).map_err(|e| HsmError::ModuleLoad { path: path.to_path_buf(), reason: e.to_string() })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(HsmError::ModuleLoad { path: path.to_path_buf(), reason: e.to_string() });
        }
    }
    map.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

pub(crate) fn find_slot(ctx: &Pkcs11, module: &Path, label: &str) -> Result<Slot> {
    let slots = ctx.get_slots_with_token().map_err(|e| device("", "C_GetSlotList", e))?;
    for slot in slots {
        if let Ok(info) = ctx.get_token_info(slot)
            && info.label() == label
        {
            return Ok(slot);
        }
    }
    Err(HsmError::TokenNotFound { label: label.to_string(), module: module.to_path_buf() })
}

fn device(token: &str, function: &str, e: CkError) -> HsmError {
    HsmError::Device { token: token.to_string(), function: function.to_string(), rv: e.to_string() }
}

/// Maps a login failure onto the errors an operator can act on.
pub(crate) fn login_error(token: &str, e: CkError) -> HsmError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect, _)
        | CkError::Pkcs11(RvError::PinInvalid, _)
        | CkError::Pkcs11(RvError::PinLenRange, _) => HsmError::WrongPin { token: token.to_string() },
        CkError::Pkcs11(RvError::PinLocked, _) => HsmError::PinLocked { token: token.to_string() },
        other => device(token, "C_Login", other),
    }
}

/// Most sessions a token keeps open at once; more concurrent callers wait for one.
const MAX_SESSIONS: usize = 16;

/// A logged-in token with a pool of sessions.
pub(crate) struct Token {
    label: String,
    ctx: Pkcs11,
    slot: Slot,
    pin_source: PinSource,
    /// SHA-256 of a per-process salt and the PIN that logged in: a later reference to the same
    /// token must present the same PIN, because PKCS#11 would otherwise accept it unchecked
    /// (login state belongs to the application, not to a reference).
    pin_digest: [u8; 32],
    pool: Mutex<Pool>,
    available: Condvar,
}

struct Pool {
    idle: Vec<Session>,
    open: usize,
}

fn pin_digest(pin: &SecretString) -> [u8; 32] {
    use secrecy::ExposeSecret;
    static SALT: OnceLock<[u8; 32]> = OnceLock::new();
    let salt = SALT.get_or_init(|| {
        let mut b = [0u8; 32];
        aws_lc_rs::rand::fill(&mut b).expect("system RNG");
        b
    });
    let mut h = sha2::Sha256::new();
    h.update(salt);
    h.update(pin.expose_secret().as_bytes());
    h.finalize().into()
}

impl Token {
    /// Opens (once per process) and logs in to the token a reference names.
    pub(crate) fn open(r: &Pkcs11Ref) -> Result<Arc<Token>> {
        let module_path = r.module_path()?;
        let key = (module_path.clone(), r.token.clone());
        // Held across login so two threads cannot both log in the same token.
        let mut map = tokens().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&key) {
            let pin = r.pin_source.read()?;
            if pin_digest(&pin) != t.pin_digest {
                return Err(HsmError::WrongPin { token: r.token.clone() });
            }
            return Ok(t.clone());
        }
        let ctx = module(&module_path)?;
        let slot = find_slot(&ctx, &module_path, &r.token)?;
        let info = ctx.get_token_info(slot).map_err(|e| device(&r.token, "C_GetTokenInfo", e))?;
        if info.user_pin_locked() {
            return Err(HsmError::PinLocked { token: r.token.clone() });
        }
        let pin = r.pin_source.read()?;
        let session = ctx.open_rw_session(slot).map_err(|e| device(&r.token, "C_OpenSession", e))?;
        login(&session, &r.token, &pin)?;
        let token = Arc::new(Token {
            label: r.token.clone(),
            ctx,
            slot,
            pin_source: r.pin_source.clone(),
            pin_digest: pin_digest(&pin),
            pool: Mutex::new(Pool { idle: vec![session], open: 1 }),
            available: Condvar::new(),
        });
        map.insert(key, token.clone());
        Ok(token)
    }

    /// Drops the cached login for a token so that the next open starts afresh: after a token
    /// was removed and returned, its old sessions are dead.
    pub(crate) fn forget(r: &Pkcs11Ref) {
        if let Ok(module_path) = r.module_path() {
            tokens().lock().unwrap_or_else(|p| p.into_inner()).remove(&(module_path, r.token.clone()));
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Runs `f` on a pooled session that is logged in. A lost login (token reset, all
    /// sessions closed) is restored from the PIN source first; a session the token says is
    /// gone is dropped rather than returned.
    pub(crate) fn with_session<T>(
        &self,
        function: &str,
        f: impl Fn(&Session) -> std::result::Result<T, CkError>,
    ) -> Result<T> {
        let session = self.take_session()?;
        // Without a login, C_FindObjects silently returns only public objects, so "key not
        // found" would hide the real cause: check the session's state up front.
        let logged_in = session
            .get_session_info()
            .map(|i| {
                matches!(
                    i.session_state(),
                    SessionState::RoUser | SessionState::RwUser | SessionState::RwSecurityOfficer
                )
            })
            .unwrap_or(true);
        let mut result = if logged_in {
            f(&session)
        } else {
            Err(CkError::Pkcs11(RvError::UserNotLoggedIn, cryptoki::context::Function::Login))
        };
        if let Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) = result {
            let pin: SecretString = self.pin_source.read()?;
            if let Err(e) = login(&session, &self.label, &pin) {
                self.return_session(session, false);
                return Err(e);
            }
            result = f(&session);
        }
        let dead = matches!(
            &result,
            Err(CkError::Pkcs11(
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent,
                _,
            ))
        );
        self.return_session(session, !dead);
        result.map_err(|e| device(&self.label, function, e))
    }

    fn take_session(&self) -> Result<Session> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if pool.open < MAX_SESSIONS {
                pool.open += 1;
                drop(pool);
                return self.ctx.open_rw_session(self.slot).map_err(|e| {
                    self.pool.lock().unwrap_or_else(|p| p.into_inner()).open -= 1;
                    device(&self.label, "C_OpenSession", e)
                });
            }
            pool = self.available.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn return_session(&self, session: Session, keep: bool) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if keep {
            pool.idle.push(session);
        } else {
            pool.open -= 1;
            drop(session);
        }
        self.available.notify_one();
    }

    pub(crate) fn supports(&self, mechanism: MechanismType) -> Result<bool> {
        // C_GetMechanismInfo rather than the whole list: cryptoki logs an error for every
        // vendor mechanism in a list it cannot name.
        match self.ctx.get_mechanism_info(self.slot, mechanism) {
            Ok(_) => Ok(true),
            Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => Ok(false),
            Err(e) => Err(device(&self.label, "C_GetMechanismInfo", e)),
        }
    }

    fn require(&self, mechanism: MechanismType, name: &str) -> Result<()> {
        if self.supports(mechanism)? {
            Ok(())
        } else {
            Err(HsmError::MechanismUnsupported { token: self.label.clone(), mechanism: name.to_string() })
        }
    }

    pub(crate) fn random(&self, len: usize) -> Result<Vec<u8>> {
        self.with_session("C_GenerateRandom", |s| s.generate_random_vec(len as u32))
    }
}

fn login(session: &Session, token: &str, pin: &SecretString) -> Result<()> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(login_error(token, e)),
    }
}

fn ec_params(kind: PublicKeyKind) -> Vec<u8> {
    let oid = match kind {
        PublicKeyKind::EcP256 => OID_P256,
        _ => OID_P384,
    };
    yasna::construct_der(|w| w.write_oid(&yasna::models::ObjectIdentifier::from_slice(oid)))
}

/// A private key in a token, with its public half.
pub(crate) struct TokenKey {
    pub(crate) token: Arc<Token>,
    pub(crate) object: String,
    handle: ObjectHandle,
    pub(crate) public: PublicKey,
}

impl TokenKey {
    pub(crate) fn find(r: &Pkcs11Ref) -> Result<TokenKey> {
        let token = Token::open(r)?;
        let label = r.object.clone();
        let handles = token.with_session("C_FindObjects", |s| {
            s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(label.as_bytes().to_vec())])
        })?;
        let handle = match handles.as_slice() {
            [] => {
                return Err(HsmError::KeyNotFound { token: r.token.clone(), object: label });
            }
            [h] => *h,
            _ => {
                return Err(HsmError::AmbiguousKey { token: r.token.clone(), object: label });
            }
        };
        let public = read_public(&token, handle, &label)?;
        Ok(TokenKey { token, object: label, handle, public })
    }

    pub(crate) fn algorithm(&self) -> KeyAlgorithm {
        self.public.algorithm()
    }

    /// Signs in the token and returns the X.509 form of the signature.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        match self.public.kind() {
            kind @ (PublicKeyKind::EcP256 | PublicKeyKind::EcP384) => {
                // SoftHSM (and many HSMs) lack CKM_ECDSA_SHA256: hash here, sign the digest.
                let digest = match kind {
                    PublicKeyKind::EcP256 => sha2::Sha256::digest(msg).to_vec(),
                    _ => sha2::Sha384::digest(msg).to_vec(),
                };
                let raw = self.token.with_session("C_Sign", |s| s.sign(&Mechanism::Ecdsa, self.handle, &digest))?;
                ecdsa_raw_to_der(&raw)
            }
            PublicKeyKind::Rsa { .. } => {
                self.token.with_session("C_Sign", |s| s.sign(&Mechanism::Sha256RsaPkcs, self.handle, msg))
            }
        }
    }

    pub(crate) fn attributes(&self) -> Result<Vec<Attribute>> {
        self.token.with_session("C_GetAttributeValue", |s| {
            s.get_attributes(
                self.handle,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Sign,
                    AttributeType::Id,
                ],
            )
        })
    }
}

/// Converts PKCS#11's raw `r || s` into the DER ECDSA-Sig-Value X.509 carries.
pub(crate) fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(HsmError::KeyFormat(format!("token returned a {}-byte ECDSA signature", raw.len())));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_bigint_bytes(r, true);
            w.next().write_bigint_bytes(s, true);
        })
    }))
}

/// Reads the public key that shares the private key's CKA_ID.
fn read_public(token: &Token, private: ObjectHandle, label: &str) -> Result<PublicKey> {
    let attrs = token.with_session("C_GetAttributeValue", |s| {
        s.get_attributes(private, &[AttributeType::KeyType, AttributeType::Id])
    })?;
    let mut key_type = None;
    let mut id = Vec::new();
    for a in attrs {
        match a {
            Attribute::KeyType(k) => key_type = Some(k),
            Attribute::Id(i) => id = i,
            _ => {}
        }
    }
    let key_type = key_type.ok_or_else(|| HsmError::UnsupportedKey(format!("{label}: token reports no key type")))?;
    let pubs = token.with_session("C_FindObjects", |s| {
        s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(id.clone())])
    })?;
    let Some(&pub_handle) = pubs.first() else {
        return Err(HsmError::KeyNotFound {
            token: token.label().to_string(),
            object: format!("{label} (public half)"),
        });
    };
    public_from_handle(token, pub_handle, key_type, label)
}

fn public_from_handle(token: &Token, handle: ObjectHandle, key_type: KeyType, label: &str) -> Result<PublicKey> {
    if key_type == KeyType::EC {
        let attrs = token.with_session("C_GetAttributeValue", |s| {
            s.get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])
        })?;
        let (mut params, mut point) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::EcParams(p) => params = p,
                Attribute::EcPoint(p) => point = p,
                _ => {}
            }
        }
        let kind = if params == ec_params(PublicKeyKind::EcP256) {
            PublicKeyKind::EcP256
        } else if params == ec_params(PublicKeyKind::EcP384) {
            PublicKeyKind::EcP384
        } else {
            return Err(HsmError::UnsupportedKey(format!("{label}: curve is not P-256 or P-384")));
        };
        let point_len = if kind == PublicKeyKind::EcP256 { 65 } else { 97 };
        // PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some tokens return the bare point.
        let point = if point.len() == point_len + 2 && point[0] == 0x04 && point[1] as usize == point_len {
            point[2..].to_vec()
        } else {
            point
        };
        PublicKey::from_ec_point(kind, point)
    } else if key_type == KeyType::RSA {
        let attrs = token.with_session("C_GetAttributeValue", |s| {
            s.get_attributes(handle, &[AttributeType::Modulus, AttributeType::PublicExponent])
        })?;
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Modulus(m) => n = m,
                Attribute::PublicExponent(x) => e = x,
                _ => {}
            }
        }
        PublicKey::from_rsa_parts(&n, &e)
    } else {
        Err(HsmError::UnsupportedKey(format!("{label}: only EC and RSA keys are supported")))
    }
}

/// Generates a key pair inside the token, then proves it: reads the public key back, signs a
/// random nonce in the token and verifies that signature in software.
pub(crate) fn generate(r: &Pkcs11Ref, alg: KeyAlgorithm) -> Result<PublicKey> {
    let token = Token::open(r)?;
    let label = r.object.as_bytes().to_vec();
    let existing = token.with_session("C_FindObjects", |s| s.find_objects(&[Attribute::Label(label.clone())]))?;
    if !existing.is_empty() {
        return Err(HsmError::LabelExists { token: r.token.clone(), object: r.object.clone() });
    }
    let (gen_mech, kind) = match alg {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
            token.require(MechanismType::ECC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN")?;
            token.require(MechanismType::ECDSA, "CKM_ECDSA")?;
            let kind = if alg == KeyAlgorithm::EcdsaP256 { PublicKeyKind::EcP256 } else { PublicKeyKind::EcP384 };
            (Mechanism::EccKeyPairGen, kind)
        }
        KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            token.require(MechanismType::RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN")?;
            token.require(MechanismType::SHA256_RSA_PKCS, "CKM_SHA256_RSA_PKCS")?;
            let bits = if alg == KeyAlgorithm::Rsa3072 { 3072 } else { 4096 };
            (Mechanism::RsaPkcsKeyPairGen, PublicKeyKind::Rsa { bits })
        }
    };
    // A random CKA_ID ties the halves together without depending on labels.
    let id = token.random(16)?;
    let mut pub_tpl = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Label(label.clone()),
        Attribute::Id(id.clone()),
    ];
    match kind {
        PublicKeyKind::Rsa { bits } => {
            pub_tpl.push(Attribute::ModulusBits((bits as u64).into()));
            pub_tpl.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
        }
        _ => pub_tpl.push(Attribute::EcParams(ec_params(kind))),
    }
    let priv_tpl = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        // A signing key and nothing else: no decrypt, derive or unwrap.
        Attribute::Decrypt(false),
        Attribute::Derive(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.clone()),
        Attribute::Id(id.clone()),
    ];
    let (pub_h, priv_h) =
        token.with_session("C_GenerateKeyPair", |s| s.generate_key_pair(&gen_mech, &pub_tpl, &priv_tpl))?;
    let checked = (|| {
        let key_type = if matches!(kind, PublicKeyKind::Rsa { .. }) { KeyType::RSA } else { KeyType::EC };
        let public = public_from_handle(&token, pub_h, key_type, &r.object)?;
        let key = TokenKey { token: token.clone(), object: r.object.clone(), handle: priv_h, public: public.clone() };
        let nonce = token.random(32)?;
        let sig = key.sign(&nonce)?;
        public.verify(public.signature_oid(), &nonce, &sig).map_err(|_| HsmError::SelfTest(r.object.clone()))?;
        Ok(public)
    })();
    if checked.is_err() {
        // A key that failed its self-test must not linger under the label.
        let _ = token.with_session("C_DestroyObject", |s| s.destroy_object(priv_h));
        let _ = token.with_session("C_DestroyObject", |s| s.destroy_object(pub_h));
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_errors_map_to_operator_errors() {
        let wrong = login_error("t", CkError::Pkcs11(RvError::PinIncorrect, cryptoki::context::Function::Login));
        assert!(matches!(wrong, HsmError::WrongPin { .. }));
        assert_eq!(wrong.to_string(), "wrong PIN for token \"t\"");
        let locked = login_error("t", CkError::Pkcs11(RvError::PinLocked, cryptoki::context::Function::Login));
        assert!(matches!(locked, HsmError::PinLocked { .. }));
        let other = login_error("t", CkError::Pkcs11(RvError::DeviceError, cryptoki::context::Function::Login));
        assert!(matches!(other, HsmError::Device { .. }));
    }

    #[test]
    fn raw_ecdsa_signature_becomes_der() {
        // r has its high bit set (needs a 0x00 pad); s has a leading zero byte (is trimmed).
        let mut raw = vec![0x80; 32];
        raw.extend(std::iter::once(0x00).chain(std::iter::repeat_n(0x11, 31)));
        let der = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x44, 0x02, 0x21, 0x00]);
        assert_eq!(&der[37..39], &[0x02, 0x1f]);
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_err());
    }

    #[test]
    fn missing_module_is_named() {
        let err = module(Path::new("/nonexistent/libpkcs11.so")).unwrap_err();
        assert!(matches!(err, HsmError::ModuleNotFound { .. }));
        assert!(err.to_string().contains("/nonexistent/libpkcs11.so"));
    }
}
