//! One syntax for key references everywhere: RFC 7512 `pkcs11:` URIs and `file:` paths.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use secrecy::SecretString;

use crate::error::{HsmError, Result};

/// Where a key lives. Displaying it never shows a PIN: a reference only names where the PIN
/// comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyRef {
    Pkcs11(Pkcs11Ref),
    File(PathBuf),
}

#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Ref {
    pub token: String,
    pub object: String,
    /// `module-path`; when absent the module comes from `PKCS11_MODULE`.
    pub module: Option<PathBuf>,
    pub pin_source: PinSource,
}

#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

impl PinSource {
    /// Reads the PIN. Errors name the variable or file, never its content.
    pub fn read(&self) -> Result<SecretString> {
        let raw =
            match self {
                PinSource::Env(var) => std::env::var(var)
                    .map_err(|_| HsmError::PinSource(format!("environment variable {var} is not set")))?,
                PinSource::File(path) => std::fs::read_to_string(path)
                    .map_err(|e| HsmError::PinSource(format!("{}: {e}", path.display())))?,
            };
        // A PIN file written by `echo` ends with a newline that is not part of the PIN.
        let pin = raw.trim_end_matches(['\n', '\r']).to_string();
        if pin.is_empty() {
            return Err(HsmError::PinSource(format!("{self} is empty")));
        }
        Ok(SecretString::from(pin))
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Env(v) => write!(f, "env:{v}"),
            PinSource::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Pkcs11Ref {
    /// The module to load: `module-path`, else `PKCS11_MODULE`.
    pub fn module_path(&self) -> Result<PathBuf> {
        if let Some(m) = &self.module {
            return Ok(m.clone());
        }
        match std::env::var_os("PKCS11_MODULE") {
            Some(m) if !m.is_empty() => Ok(PathBuf::from(m)),
            _ => Err(HsmError::ModuleNotConfigured),
        }
    }
}

impl KeyRef {
    pub fn file(path: impl AsRef<Path>) -> Self {
        KeyRef::File(path.as_ref().to_path_buf())
    }

    pub fn is_pkcs11(&self) -> bool {
        matches!(self, KeyRef::Pkcs11(_))
    }
}

impl FromStr for KeyRef {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(HsmError::InvalidKeyRef("file: needs a path".into()));
            }
            return Ok(KeyRef::File(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("pkcs11:") {
            return parse_pkcs11(rest).map(KeyRef::Pkcs11);
        }
        Err(HsmError::InvalidKeyRef(
            "expected pkcs11:token=<label>;object=<label>?module-path=<path>&pin-source=env:<VAR> or file:<path>"
                .into(),
        ))
    }
}

fn decode(component: &str, what: &str) -> Result<String> {
    percent_decode_str(component)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| HsmError::InvalidKeyRef(format!("{what} is not valid UTF-8 after percent-decoding")))
}

fn parse_pkcs11(rest: &str) -> Result<Pkcs11Ref> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut token = None;
    let mut object = None;
    for (i, attr) in path.split(';').filter(|a| !a.is_empty()).enumerate() {
        // Never echo a malformed attribute: it may be a mistyped PIN.
        let (k, v) = attr
            .split_once('=')
            .ok_or_else(|| HsmError::InvalidKeyRef(format!("path attribute {} has no '='", i + 1)))?;
        let v = decode(v, k)?;
        match k {
            "token" => token = Some(v),
            "object" => object = Some(v),
            // RFC 7512 allows these; we select by token and object label only.
            "type" if v == "private" => {}
            "type" => {
                return Err(HsmError::InvalidKeyRef(format!(
                    "type={v} is not supported; key references name private keys"
                )));
            }
            other => {
                return Err(HsmError::InvalidKeyRef(format!(
                    "unsupported path attribute {other:?} (supported: token, object)"
                )));
            }
        }
    }
    let mut module = None;
    let mut pin_source = None;
    for (i, attr) in query.unwrap_or("").split('&').filter(|a| !a.is_empty()).enumerate() {
        let (k, v) = attr
            .split_once('=')
            .ok_or_else(|| HsmError::InvalidKeyRef(format!("query attribute {} has no '='", i + 1)))?;
        match k {
            "module-path" => module = Some(PathBuf::from(decode(v, k)?)),
            "pin-source" => {
                let v = decode(v, k)?;
                pin_source = Some(if let Some(var) = v.strip_prefix("env:") {
                    if var.is_empty() {
                        return Err(HsmError::InvalidKeyRef("pin-source=env: needs a variable name".into()));
                    }
                    PinSource::Env(var.to_string())
                } else if let Some(p) = v.strip_prefix("file:") {
                    PinSource::File(PathBuf::from(p))
                } else {
                    // A path without scheme is RFC 7512's form.
                    PinSource::File(PathBuf::from(v))
                });
            }
            // A PIN in the reference would end up in argv, shell history and logs.
            "pin-value" => {
                return Err(HsmError::InvalidKeyRef(
                    "pin-value is refused: give pin-source=env:<VAR> or pin-source=file:<path>".into(),
                ));
            }
            other => {
                return Err(HsmError::InvalidKeyRef(format!(
                    "unsupported query attribute {other:?} (supported: module-path, pin-source)"
                )));
            }
        }
    }
    let token = token.ok_or_else(|| HsmError::InvalidKeyRef("pkcs11: reference needs token=<label>".into()))?;
    let object = object.ok_or_else(|| HsmError::InvalidKeyRef("pkcs11: reference needs object=<label>".into()))?;
    let pin_source = pin_source.ok_or_else(|| {
        HsmError::InvalidKeyRef("pkcs11: reference needs pin-source=env:<VAR> or pin-source=file:<path>".into())
    })?;
    Ok(Pkcs11Ref { token, object, module, pin_source })
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::File(p) => write!(f, "file:{}", p.display()),
            KeyRef::Pkcs11(r) => {
                write!(f, "pkcs11:token={};object={}", r.token, r.object)?;
                let mut sep = '?';
                if let Some(m) = &r.module {
                    write!(f, "{sep}module-path={}", m.display())?;
                    sep = '&';
                }
                write!(f, "{sep}pin-source={}", r.pin_source)
            }
        }
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({self})")
    }
}

impl fmt::Debug for Pkcs11Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Ref({})", KeyRef::Pkcs11(self.clone()))
    }
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinSource({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_pkcs11_reference() {
        let r: KeyRef = "pkcs11:token=root%20ca;object=root-2026?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:ROOT_PIN"
            .parse()
            .unwrap();
        let KeyRef::Pkcs11(p) = &r else { panic!() };
        assert_eq!(p.token, "root ca");
        assert_eq!(p.object, "root-2026");
        assert_eq!(p.module.as_deref(), Some(Path::new("/usr/lib/softhsm/libsofthsm2.so")));
        assert_eq!(p.pin_source, PinSource::Env("ROOT_PIN".into()));
    }

    #[test]
    fn pin_file_source_and_file_keys() {
        let r: KeyRef = "pkcs11:token=t;object=o?pin-source=file:/run/pin".parse().unwrap();
        let KeyRef::Pkcs11(p) = r else { panic!() };
        assert_eq!(p.pin_source, PinSource::File("/run/pin".into()));
        assert_eq!(p.module, None);
        assert_eq!("file:/k.pem".parse::<KeyRef>().unwrap(), KeyRef::File("/k.pem".into()));
    }

    #[test]
    fn rejects_incomplete_or_unsafe_references() {
        for bad in [
            "pkcs11:object=o?pin-source=env:X",
            "pkcs11:token=t?pin-source=env:X",
            "pkcs11:token=t;object=o",
            "pkcs11:token=t;object=o?pin-value=1234",
            "pkcs11:token=t;object=o?pin-value:1234",
            "pkcs11:token=t;object=o;1234?pin-source=env:X",
            "pkcs11:token=t;object=o;serial=1?pin-source=env:X",
            "pkcs11:token=t;object=o?pin-source=env:",
            "file:",
            "/plain/path.pem",
        ] {
            let err = bad.parse::<KeyRef>().unwrap_err();
            assert!(matches!(err, HsmError::InvalidKeyRef(_)), "{bad}: {err}");
            assert!(!err.to_string().contains("1234"));
        }
    }

    #[test]
    fn debug_and_display_never_show_a_pin() {
        let r: KeyRef = "pkcs11:token=t;object=o?pin-source=env:SECRET_VAR".parse().unwrap();
        assert_eq!(r.to_string(), "pkcs11:token=t;object=o?pin-source=env:SECRET_VAR");
        assert_eq!(format!("{r:?}"), "KeyRef(pkcs11:token=t;object=o?pin-source=env:SECRET_VAR)");
    }

    #[test]
    fn pin_file_trailing_newline_is_trimmed_and_empty_is_refused() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "4321\n").unwrap();
        assert_eq!(PinSource::File(f.clone()).read().unwrap().expose_secret(), "4321");
        std::fs::write(&f, "\n").unwrap();
        let err = PinSource::File(f).read().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
