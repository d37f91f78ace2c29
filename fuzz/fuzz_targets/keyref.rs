//! Key references (`hsm::KeyRef`): `pkcs11:` URIs and `file:` paths, as typed by operators
//! and read from ceremony files and the server configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Characters that `Display` would have to percent-encode to round-trip; it does not, so
/// components holding them are left out of the round-trip property.
fn plain(s: &str) -> bool {
    !s.contains(['%', ';', '?', '&', '='])
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(r) = s.parse::<hsm::KeyRef>() else { return };
    let shown = r.to_string();
    let _ = format!("{r:?}");
    let _ = r.is_pkcs11();
    let roundtrips = match &r {
        hsm::KeyRef::File(_) => true,
        hsm::KeyRef::Pkcs11(p) => {
            plain(&p.token)
                && plain(&p.object)
                && p.module.as_ref().is_none_or(|m| plain(&m.to_string_lossy()))
                && plain(&p.pin_source.to_string())
        }
    };
    // What a transcript or error shows must name the same key when read back.
    if roundtrips {
        let again = shown.parse::<hsm::KeyRef>().unwrap_or_else(|e| panic!("{shown:?} does not parse: {e}"));
        assert!(again == r, "{s:?} shows as {shown:?}, which names another key");
    }
});
