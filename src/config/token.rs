//! A chain's `validator-key` given as a PKCS#11 URI (RFC 7512):
//! `pkcs11:token=T;object=O?module-path=M&pin-source=P`, the token by its
//! label, the key by its label (`object`) or `id`, the module's path, and
//! where the PIN is: a file only keyraft's user reads (`file:/PATH`) or an
//! environment variable (`env:NAME`). A PIN in the URI itself
//! (`pin-value`) is refused: the configuration and command line are read
//! by others.
//!
//! Owns: parsing and checking the URI (the module is a file, the PIN file
//! is private). Must not: load the module or read the PIN
//! (`signer::token` does, at start).

use std::path::PathBuf;

use super::{invalid, ConfigError};

/// Where a token's PIN comes from: a file only its owner reads, or an
/// environment variable (systemd's `EnvironmentFile=`, or `LoadCredential=`
/// through a file). Never the command line or the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    File(PathBuf),
    Env(String),
}

/// A parsed `pkcs11:` URI: `pkcs11:token=T;object=O?module-path=M&pin-source=P`
/// (`id=` with percent-encoded bytes names the key too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUri {
    pub token: String,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module: PathBuf,
    pub pin: PinSource,
}

impl std::fmt::Display for TokenUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pkcs11:token={}", self.token)?;
        if let Some(o) = &self.object {
            write!(f, ";object={o}")?;
        }
        if let Some(id) = &self.id {
            write!(f, ";id=")?;
            id.iter().try_for_each(|b| write!(f, "%{b:02x}"))?;
        }
        Ok(())
    }
}

impl TokenUri {
    /// Whether `s` is meant as a PKCS#11 URI rather than a file.
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("pkcs11:")
    }

    pub fn parse(uri: &str) -> Result<TokenUri, ConfigError> {
        // Named without its query: a PIN put there is not repeated.
        let shown = uri.split_once('?').map_or(uri, |(path, _)| path);
        Self::parse_parts(uri).map_err(|why| invalid(format!("bad PKCS#11 URI '{shown}': {why}")))
    }

    fn parse_parts(uri: &str) -> Result<TokenUri, UriError> {
        let rest = uri.strip_prefix("pkcs11:").ok_or(UriError::NotPkcs11)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut token, mut object, mut id, mut module, mut pin) = (None, None, None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| UriError::NotNameValue(attr.to_string()))?;
            let v = unescape(v)?;
            match k {
                "token" => token = Some(text(v)?),
                "object" => object = Some(text(v)?),
                "id" => id = Some(v),
                "type" if v == b"private" => {}
                "type" => return Err(UriError::NotPrivate),
                _ => return Err(UriError::UnknownAttribute(k.to_string())),
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| UriError::NotNameValue(attr.to_string()))?;
            let v = text(unescape(v)?)?;
            match k {
                "module-path" => module = Some(PathBuf::from(v)),
                "pin-source" => pin = Some(pin_source(&v)?),
                "pin-value" => return Err(UriError::PinValue),
                _ => return Err(UriError::UnknownQuery(k.to_string())),
            }
        }
        let token = token.ok_or(UriError::NoToken)?;
        if object.is_none() && id.is_none() {
            return Err(UriError::NoKey);
        }
        let module = module.ok_or(UriError::NoModule)?;
        if !module.is_absolute() {
            return Err(UriError::RelativeModule);
        }
        let pin = pin.ok_or(UriError::NoPinSource)?;
        Ok(TokenUri {
            token,
            object,
            id,
            module,
            pin,
        })
    }

    /// The key's name for messages: `object=O`, `id=..`, or both.
    pub fn key_name(&self) -> String {
        let mut s = self.to_string();
        s.drain(..s.find(';').map_or(s.len(), |i| i + 1));
        s
    }
}

impl TokenUri {
    /// What can be checked before the module is loaded: the module is a
    /// file, and a PIN file exists and only its owner reads it.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.module.is_file() {
            return Err(invalid(format!(
                "PKCS#11 module {} does not exist (for token '{}'; SoftHSM2's is /usr/lib/softhsm/libsofthsm2.so)",
                self.module.display(),
                self.token
            )));
        }
        if let PinSource::File(p) = &self.pin {
            let meta = std::fs::metadata(p).map_err(|e| {
                invalid(format!(
                    "PIN file {} of token '{}': {e}",
                    p.display(),
                    self.token
                ))
            })?;
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "PIN file {} is readable by others (mode {mode:o}): chmod 600 it",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

/// Why a `pkcs11:` URI is refused (said after the URI, its query left
/// out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum UriError {
    #[error("it must start with pkcs11:")]
    NotPkcs11,
    #[error("'{0}' is not NAME=VALUE")]
    NotNameValue(String),
    #[error("bad percent-escape in '{0}'")]
    BadEscape(String),
    #[error("a value is not UTF-8")]
    NotUtf8,
    #[error("type must be private (the key that signs)")]
    NotPrivate,
    #[error("unknown attribute '{0}' (keyraft reads token, object, id and type)")]
    UnknownAttribute(String),
    #[error("unknown query attribute '{0}' (keyraft reads module-path and pin-source)")]
    UnknownQuery(String),
    #[error("pin-value puts the PIN where others read it: use pin-source=file:/PATH (mode 600) or pin-source=env:NAME")]
    PinValue,
    #[error("no token= (the token's label)")]
    NoToken,
    #[error("no object= or id= (which key)")]
    NoKey,
    #[error("no module-path= (the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so)")]
    NoModule,
    #[error("module-path must be absolute")]
    RelativeModule,
    #[error("no pin-source= (file:/PATH of mode 600, or env:NAME)")]
    NoPinSource,
    #[error("pin-source=env: needs a variable's name")]
    EmptyPinEnv,
    #[error("pin-source '{0}' is neither file:/ABSOLUTE/PATH nor env:NAME")]
    BadPinSource(String),
}

fn pin_source(v: &str) -> Result<PinSource, UriError> {
    if let Some(name) = v.strip_prefix("env:") {
        return match name.is_empty() {
            true => Err(UriError::EmptyPinEnv),
            false => Ok(PinSource::Env(name.to_string())),
        };
    }
    let path = v.strip_prefix("file:").unwrap_or(v);
    let path = path.strip_prefix("//").unwrap_or(path);
    match path.starts_with('/') {
        true => Ok(PinSource::File(PathBuf::from(path))),
        false => Err(UriError::BadPinSource(v.to_string())),
    }
}

/// RFC 3986 percent-decoding.
fn unescape(v: &str) -> Result<Vec<u8>, UriError> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UriError::BadEscape(v.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(v: Vec<u8>) -> Result<String, UriError> {
    String::from_utf8(v).map_err(|_| UriError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_a_token_a_key_a_module_and_a_pin_source() {
        let u = TokenUri::parse(
            "pkcs11:token=kr%20one;object=cosmoshub?module-path=/usr/lib/m.so&pin-source=file:/etc/keyraft/pin",
        )
        .unwrap();
        assert_eq!(u.token, "kr one");
        assert_eq!(u.object.as_deref(), Some("cosmoshub"));
        assert_eq!(u.module, PathBuf::from("/usr/lib/m.so"));
        assert_eq!(u.pin, PinSource::File("/etc/keyraft/pin".into()));
        let u = TokenUri::parse(
            "pkcs11:token=t;id=%01%02;type=private?module-path=/m.so&pin-source=env:PIN",
        )
        .unwrap();
        assert_eq!(u.id, Some(vec![1, 2]));
        assert_eq!(u.pin, PinSource::Env("PIN".into()));
        assert_eq!(u.to_string(), "pkcs11:token=t;id=%01%02");
        // (uri, words the error must carry)
        let bad = [
            (
                "pkcs11:object=k?module-path=/m.so&pin-source=/p",
                "no token=",
            ),
            (
                "pkcs11:token=t?module-path=/m.so&pin-source=/p",
                "no object= or id=",
            ),
            ("pkcs11:token=t;object=k?pin-source=/p", "no module-path="),
            (
                "pkcs11:token=t;object=k?module-path=m.so&pin-source=/p",
                "absolute",
            ),
            (
                "pkcs11:token=t;object=k?module-path=/m.so",
                "no pin-source=",
            ),
            (
                "pkcs11:token=t;object=k?module-path=/m.so&pin-value=1234",
                "pin-value",
            ),
            (
                "pkcs11:token=t;object=k?module-path=/m.so&pin-source=pin.txt",
                "neither",
            ),
            (
                "pkcs11:token=t;object=k;slot=1?module-path=/m.so&pin-source=/p",
                "unknown attribute 'slot'",
            ),
            (
                "pkcs11:token=t;object=k;type=public?module-path=/m.so&pin-source=/p",
                "type must be private",
            ),
            (
                "pkcs11:token=t%2;object=k?module-path=/m.so&pin-source=/p",
                "percent-escape",
            ),
        ];
        for (uri, words) in bad {
            let e = TokenUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(words), "{uri}: {e}");
        }
    }
}
