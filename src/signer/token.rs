//! A consensus key held in hardware and reached through PKCS#11, the one
//! interface every HSM speaks (SoftHSM2, YubiHSM2, Nitrokey, a cloud HSM's
//! module): an RFC 7512 `pkcs11:` URI names the token and the key, its
//! query the module and where the PIN is; signatures are `CKM_EDDSA` over a
//! `CKK_EC_EDWARDS` key.
//!
//! Owns: the URI and its PIN source, the module opened once per path
//! ([`Modules`]), a small pool of logged-in sessions, the public key read
//! from the token, signing, reopening a token after a failure, closing a
//! dropped key's sessions off the dropping thread (and waiting for them
//! before the process exits, [`settle`]), and putting a key file's seed
//! into a token ([`import`]). Must not: decide whether to sign, keep a
//! session that failed, or read a PIN from the command line or the
//! configuration file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::Digest as _;

use crate::config::{PinSource, TokenUri};

/// Sessions kept open per key: enough for the chain's sign path and its
/// probe at once; more are opened when needed and closed after use.
const POOL: usize = 2;

/// Ed25519's curve as `CKA_EC_PARAMS`: the DER of OID 1.3.101.112.
const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot load PKCS#11 module {module}: {why}")]
    Module { module: String, why: String },
    #[error("no token labelled '{token}' in {module} (tokens: {present})")]
    NoToken {
        token: String,
        module: String,
        present: String,
    },
    #[error("the PIN for token '{token}' {why}")]
    Pin { token: String, why: String },
    #[error("token '{token}' holds no Ed25519 {what} {key}")]
    NoKey {
        token: String,
        what: &'static str,
        key: String,
    },
    #[error("token '{token}' holds {n} Ed25519 private keys matching {key}: name one by object= and id=")]
    SeveralKeys {
        token: String,
        n: usize,
        key: String,
    },
    #[error("token '{token}': the private key {key} does not sign for its public key")]
    Mismatch { token: String, key: String },
    /// The token would not sign these bytes (too long for it, say): the
    /// request is refused, the token is not taken as failing.
    #[error("token '{token}' refused to sign these bytes: {why}")]
    Refused { token: String, why: String },
    #[error("several tokens are labelled '{token}' in {module}: give each its own label")]
    SeveralTokens { token: String, module: String },
    #[error("token '{token}' already holds another key under {key}: remove it first, or name another object")]
    Occupied { token: String, key: String },
    #[error("token '{token}': {op}: {why}")]
    Failed {
        token: String,
        op: &'static str,
        why: String,
    },
}

/// The PKCS#11 modules of this process, each loaded and initialized once
/// (a second `C_Initialize` of one module fails, and a `C_Finalize` ends
/// every session of it). Each path has a slot of its own, locked while
/// its module loads: a module whose `C_Initialize` never returns holds
/// its own slot, never the map, so keys in other modules still open.
#[derive(Default)]
pub struct Modules(Mutex<BTreeMap<PathBuf, Loaded>>);

/// One path's module, once loaded; locked while it loads.
type Loaded = Arc<Mutex<Option<Arc<Module>>>>;

impl Modules {
    /// The module at `path`, loaded and initialized on its first use.
    /// Blocking while it loads. Where an earlier load of it has not
    /// returned (one a reload gave up on), an error at once: waiting
    /// behind it would leave one more thread stuck per reload.
    pub fn open(&self, path: &Path) -> Result<Arc<Module>, TokenError> {
        let err = |why: String| TokenError::Module {
            module: path.display().to_string(),
            why,
        };
        let slot = {
            let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(path.to_path_buf()).or_default().clone()
        };
        let mut slot = match slot.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(err(
                "an earlier load of it has not returned (restart keyraft once the module answers)"
                    .into(),
            )),
        };
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        let ctx = Pkcs11::new(path).map_err(|e| err(e.to_string()))?;
        initialize(&ctx).map_err(|e| err(e.to_string()))?;
        let m = Arc::new(Module {
            path: path.to_path_buf(),
            ctx,
            generation: RwLock::new(0),
            reinitialized: Mutex::new(None),
        });
        *slot = Some(m.clone());
        Ok(m)
    }
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One loaded PKCS#11 module.
pub struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    /// How many times the module was initialized again
    /// ([`Module::reinitialize`]); read-locked by every use, so that none
    /// is inside the module while it is, and a session of an earlier
    /// generation is known dead without a call.
    generation: RwLock<u64>,
    /// When it was last initialized again: at most once per
    /// [`REINITIALIZE_EVERY`], as every key's sessions on it end then.
    reinitialized: Mutex<Option<std::time::Instant>>,
}

/// Least time between two initializations of a module again.
const REINITIALIZE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Module {
    /// Finalizes and initializes the module again: some modules (SoftHSM2)
    /// see a token that came back only then. Every session of it ends.
    /// `Ok(false)`: not now, for it was done too recently, or a call is
    /// inside the module. Waiting for that call would be waiting for as
    /// long as its token hangs, with every other key of the module queued
    /// behind the wait; the next probe tries again. A call that never
    /// returns (a sign, or a key's opening that a reload gave up on) keeps
    /// the module from being initialized again until keyraft restarts:
    /// finalizing a module under a call is undefined in PKCS#11.
    fn reinitialize(&self) -> Result<bool, TokenError> {
        let mut last = self.reinitialized.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REINITIALIZE_EVERY) {
            return Ok(false);
        }
        let mut generation = match self.generation.try_write() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        *last = Some(std::time::Instant::now());
        drop(last);
        let err = |e: CkError| TokenError::Module {
            module: self.path.display().to_string(),
            why: e.to_string(),
        };
        match self.ctx.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => return Err(err(e)),
        }
        *generation += 1;
        initialize(&self.ctx).map_err(err).map(|()| true)
    }
}

/// A key on a token: what signs, and its sessions.
pub struct TokenKey {
    uri: TokenUri,
    module: Arc<Module>,
    public: [u8; 32],
    /// Logged-in sessions not in use, each with the key's handle in it and
    /// the module's generation it was opened in. Emptied when one fails:
    /// the next use opens the token again.
    pool: Mutex<Vec<(u64, Session, ObjectHandle)>>,
    /// A digest of the PIN the token last refused: not offered again
    /// until the PIN source says another (a token locks after a few).
    rejected_pin: Mutex<Option<[u8; 32]>>,
}

impl Drop for TokenKey {
    /// Closes the sessions of the module's current generation
    /// ([`of_generation`]) on a thread of their own: closing one waits for
    /// a token that hangs, and the thread that drops a key may be the one
    /// that runs a coordinator (a chain changed by a reload). While the
    /// module is being initialized again (its lock held) none is closed:
    /// they end with it, or, where finalizing fails, stay open (a leak,
    /// never another key's session closed).
    fn drop(&mut self) {
        let pool = std::mem::take(self.pool.get_mut().unwrap_or_else(|p| p.into_inner()));
        if pool.is_empty() {
            return;
        }
        // Not closed, should the thread not start: left open.
        let pool = std::mem::ManuallyDrop::new(pool);
        let module = self.module.clone();
        CLOSING.fetch_add(1, Ordering::SeqCst);
        let close = move || {
            let _done = Closed;
            let pool = std::mem::ManuallyDrop::into_inner(pool);
            // Read-locked while the sessions are closed, as every use is.
            let current = match module.generation.try_read() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            drop(of_generation(pool, current.as_deref().copied()));
        };
        let started = std::thread::Builder::new()
            .name("keyraft-token-close".into())
            .spawn(close);
        if let Err(e) = started {
            CLOSING.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                token = %self.uri.token,
                "cannot start a thread to close a dropped key's sessions ({e}): left open"
            );
        }
    }
}

/// Threads closing a dropped key's sessions, not done yet.
static CLOSING: AtomicUsize = AtomicUsize::new(0);

/// One closing thread done, however it ends.
struct Closed;

impl Drop for Closed {
    fn drop(&mut self) {
        CLOSING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits, up to `limit`, for dropped keys' sessions to be closed: before
/// the process exits, whose exit would tear the module down under a
/// close. True when none is left.
pub fn settle(limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while CLOSING.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The sessions of `pool` opened in generation `current`. The others are
/// forgotten, not closed: a session of an earlier generation died with
/// it, and closing its handle could close a newer session (another key's)
/// that was given the same one.
fn of_generation(
    pool: Vec<(u64, Session, ObjectHandle)>,
    current: Option<u64>,
) -> Vec<(u64, Session, ObjectHandle)> {
    let (live, stale): (Vec<_>, Vec<_>) =
        pool.into_iter().partition(|(g, _, _)| Some(*g) == current);
    stale.into_iter().for_each(std::mem::forget);
    live
}

impl TokenKey {
    /// Finds the key `uri` names in `module` (logging in with its PIN) and
    /// reads its public key. Blocking.
    pub fn open(uri: &TokenUri, module: Arc<Module>) -> Result<TokenKey, TokenError> {
        // Read-locked while inside the module, as every use is: the module
        // is not initialized again under the calls.
        let (generation, session, handle, public) = {
            let generation = module.generation.read().unwrap_or_else(|p| p.into_inner());
            let session = login(uri, &module.ctx, false)?;
            let handle = find_key(uri, &session)?.ok_or_else(|| no_key(uri))?;
            let public = public_key(uri, &session)?;
            (*generation, session, handle, public)
        };
        Ok(TokenKey {
            uri: uri.clone(),
            module,
            public,
            pool: Mutex::new(vec![(generation, session, handle)]),
            rejected_pin: Mutex::new(None),
        })
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn uri(&self) -> &TokenUri {
        &self.uri
    }

    /// Signs `bytes` on the token: a whole signature, checked against the
    /// key's public key, or an error, never a part. A session that failed
    /// is closed, and every pooled one with it. Blocking.
    pub fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, TokenError> {
        let generation = self
            .module
            .generation
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let taken = {
            let mut pool = self.lock();
            let live = of_generation(std::mem::take(&mut *pool), Some(*generation));
            *pool = live;
            pool.pop()
        };
        let (session, handle) = match taken {
            Some((_, s, h)) => (s, h),
            None => self.open_key()?,
        };
        let mech = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Ed25519));
        let signed = session.sign(&mech, handle, bytes);
        let checked = match &signed {
            Ok(sig) => ed25519_dalek::Signature::from_slice(sig).is_ok_and(|sig| {
                ed25519_dalek::VerifyingKey::from_bytes(&self.public)
                    .is_ok_and(|k| k.verify_strict(bytes, &sig).is_ok())
            }),
            Err(_) => false,
        };
        match signed {
            Ok(sig) if checked => {
                let mut pool = self.lock();
                if pool.len() < POOL {
                    pool.push((*generation, session, handle));
                }
                Ok(sig)
            }
            Ok(_) => {
                self.lock().clear();
                Err(TokenError::Mismatch {
                    token: self.uri.token.clone(),
                    key: self.uri.to_string(),
                })
            }
            Err(CkError::Pkcs11(
                rv @ (RvError::DataLenRange | RvError::DataInvalid | RvError::ArgumentsBad),
                _,
            )) => Err(TokenError::Refused {
                token: self.uri.token.clone(),
                why: rv.to_string(),
            }),
            Err(e) => {
                // The token may be gone, or another now: nothing kept.
                self.lock().clear();
                Err(self.failed("sign", e.to_string()))
            }
        }
    }

    /// A new logged-in session and the key's handle in it. A PIN the
    /// token refused is not offered again until the PIN source changes.
    fn open_key(&self) -> Result<(Session, ObjectHandle), TokenError> {
        let pin = read_pin(&self.uri)?;
        let digest: [u8; 32] =
            sha2::Sha256::digest(secrecy::ExposeSecret::expose_secret(&pin).as_bytes()).into();
        let mut rejected = self.rejected_pin.lock().unwrap_or_else(|p| p.into_inner());
        if *rejected == Some(digest) {
            return Err(TokenError::Pin {
                token: self.uri.token.clone(),
                why: "was refused by the token and is not offered again until its source changes"
                    .into(),
            });
        }
        let session = match login_with(&self.uri, &self.module.ctx, false, &pin) {
            Err(e @ TokenError::Pin { .. }) => {
                *rejected = Some(digest);
                return Err(e);
            }
            done => done?,
        };
        drop(rejected);
        let handle = find_key(&self.uri, &session)?.ok_or_else(|| no_key(&self.uri))?;
        Ok((session, handle))
    }

    /// [`TokenKey::sign`], and where the token is not reached, once more
    /// after initializing the module again (a token that came back is
    /// seen then, by SoftHSM2 only then; at most every
    /// [`REINITIALIZE_EVERY`]). Only the probe does this.
    pub fn sign_or_reinitialize(&self, bytes: &[u8]) -> Result<Vec<u8>, TokenError> {
        match self.sign(bytes) {
            Err(
                e @ (TokenError::Pin { .. }
                | TokenError::NoKey { .. }
                | TokenError::SeveralKeys { .. }
                | TokenError::Mismatch { .. }
                | TokenError::Refused { .. }),
            ) => Err(e),
            Err(e) => match self.module.reinitialize()? {
                true => self.sign(bytes),
                false => Err(e),
            },
            done => done,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Session, ObjectHandle)>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, op: &'static str, why: String) -> TokenError {
        TokenError::Failed {
            token: self.uri.token.clone(),
            op,
            why,
        }
    }
}

/// The attributes that find `uri`'s key of `class`.
fn template(uri: &TokenUri, class: ObjectClass) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::EC_EDWARDS),
    ];
    if let Some(o) = &uri.object {
        t.push(Attribute::Label(o.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    t
}

/// `uri`'s PIN, read now (a file's trailing newline dropped).
fn read_pin(uri: &TokenUri) -> Result<AuthPin, TokenError> {
    let err = |why: String| TokenError::Pin {
        token: uri.token.clone(),
        why,
    };
    let pin = match &uri.pin {
        PinSource::File(p) => std::fs::read_to_string(p)
            .map_err(|e| err(format!("cannot be read from {}: {e}", p.display())))?,
        PinSource::Env(name) => std::env::var(name)
            .map_err(|_| err(format!("is not in the environment: ${name} is not set")))?,
    };
    let pin = pin.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(err("is empty".into()));
    }
    Ok(AuthPin::new(pin.into()))
}

/// The slot of the token labelled `uri.token`.
fn slot(uri: &TokenUri, module: &Pkcs11) -> Result<Slot, TokenError> {
    let slots = module
        .get_slots_with_token()
        .map_err(|e| failed(uri, "list slots", e))?;
    let mut labels = Vec::new();
    let mut found = None;
    for s in slots {
        let Ok(info) = module.get_token_info(s) else {
            continue;
        };
        let label = info.label().trim_end().to_string();
        if label == uri.token && found.replace(s).is_some() {
            return Err(TokenError::SeveralTokens {
                token: uri.token.clone(),
                module: uri.module.display().to_string(),
            });
        }
        labels.push(label);
    }
    if let Some(s) = found {
        return Ok(s);
    }
    Err(TokenError::NoToken {
        token: uri.token.clone(),
        module: uri.module.display().to_string(),
        present: if labels.is_empty() {
            "none".into()
        } else {
            labels.join(", ")
        },
    })
}

/// A logged-in session on `uri`'s token (read-write for an import).
fn login(uri: &TokenUri, module: &Pkcs11, rw: bool) -> Result<Session, TokenError> {
    login_with(uri, module, rw, &read_pin(uri)?)
}

/// [`login`] with `pin`.
fn login_with(
    uri: &TokenUri,
    module: &Pkcs11,
    rw: bool,
    pin: &AuthPin,
) -> Result<Session, TokenError> {
    let slot = slot(uri, module)?;
    let session = match rw {
        true => module.open_rw_session(slot),
        false => module.open_ro_session(slot),
    }
    .map_err(|e| failed(uri, "open a session", e))?;
    let pin_error = |why: &str| TokenError::Pin {
        token: uri.token.clone(),
        why: why.to_string(),
    };
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => Err(pin_error("is wrong (the token refused it)")),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(pin_error(
            "is locked after too many wrong tries (unlock it with the SO PIN)",
        )),
        Err(e) => Err(failed(uri, "log in", e)),
    }
}

/// The handle of `uri`'s private key in `session`, if the token holds one
/// (several are refused: which would sign is not known).
fn find_key(uri: &TokenUri, session: &Session) -> Result<Option<ObjectHandle>, TokenError> {
    let found = session
        .find_objects(&template(uri, ObjectClass::PRIVATE_KEY))
        .map_err(|e| failed(uri, "find the key", e))?;
    match found.len() {
        0 | 1 => Ok(found.first().copied()),
        n => Err(TokenError::SeveralKeys {
            token: uri.token.clone(),
            n,
            key: uri.key_name(),
        }),
    }
}

fn no_key(uri: &TokenUri) -> TokenError {
    TokenError::NoKey {
        token: uri.token.clone(),
        what: "private key",
        key: uri.key_name(),
    }
}

fn failed(uri: &TokenUri, op: &'static str, e: CkError) -> TokenError {
    TokenError::Failed {
        token: uri.token.clone(),
        op,
        why: e.to_string(),
    }
}

/// The public key beside the private one (same object/id), as 32 bytes.
fn public_key(uri: &TokenUri, session: &Session) -> Result<[u8; 32], TokenError> {
    let none = || TokenError::NoKey {
        token: uri.token.clone(),
        what: "public key",
        key: uri.key_name(),
    };
    let found = session
        .find_objects(&template(uri, ObjectClass::PUBLIC_KEY))
        .map_err(|e| failed(uri, "find the public key", e))?;
    let handle = *found.first().ok_or_else(none)?;
    let attrs = session
        .get_attributes(handle, &[AttributeType::EcPoint])
        .map_err(|e| failed(uri, "read the public key", e))?;
    let point = attrs.into_iter().find_map(|a| match a {
        Attribute::EcPoint(p) => Some(p),
        _ => None,
    });
    point.as_deref().and_then(ec_point).ok_or_else(none)
}

/// An Ed25519 `CKA_EC_POINT`: the 32 bytes, DER-wrapped as an OCTET
/// STRING (`04 20 ..`, as the standard says) or bare (as some modules do).
fn ec_point(p: &[u8]) -> Option<[u8; 32]> {
    match p {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest.try_into().ok(),
        _ => p.try_into().ok(),
    }
}

/// Puts the Ed25519 key of `seed` (whose public key is `public`) into the
/// token under `uri`'s object/id, as a private key that never leaves it
/// (sensitive, not extractable) and its public key. A token that already
/// holds this key under that name is left as it is (`Ok(false)`); one that
/// holds another is refused. Blocking.
pub fn import(
    uri: &TokenUri,
    module: &Module,
    seed: &[u8; 32],
    public: &[u8; 32],
) -> Result<bool, TokenError> {
    let _generation = module.generation.read().unwrap_or_else(|p| p.into_inner());
    let session = login(uri, &module.ctx, true)?;
    let held = find_key(uri, &session)?.map(|_| public_key(uri, &session));
    match held {
        Some(Ok(p)) if &p == public => return Ok(false),
        Some(_) => {
            return Err(TokenError::Occupied {
                token: uri.token.clone(),
                key: uri.key_name(),
            })
        }
        None => {}
    }
    let mut common = Vec::new();
    if let Some(o) = &uri.object {
        common.push(Attribute::Label(o.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        common.push(Attribute::Id(id.clone()));
    }
    common.extend([
        Attribute::KeyType(KeyType::EC_EDWARDS),
        Attribute::EcParams(ED25519_PARAMS.to_vec()),
        Attribute::Token(true),
    ]);
    let mut point = vec![0x04, 0x20];
    point.extend_from_slice(public);
    let mut public_attrs = common.clone();
    public_attrs.extend([
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::EcPoint(point),
        Attribute::Verify(true),
    ]);
    let mut private_attrs = common;
    private_attrs.extend([
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Value(seed.to_vec()),
        Attribute::Sign(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ]);
    let private = session
        .create_object(&private_attrs)
        .map_err(|e| failed(uri, "create the private key", e))?;
    if let Err(e) = session.create_object(&public_attrs) {
        // Not half a key left behind.
        let _ = session.destroy_object(private);
        return Err(failed(uri, "create the public key", e));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_key_is_read_wrapped_or_bare() {
        let mut wrapped = vec![0x04, 0x20];
        wrapped.extend([7u8; 32]);
        assert_eq!(ec_point(&wrapped), Some([7; 32]));
        assert_eq!(ec_point(&[7; 32]), Some([7; 32]));
        assert_eq!(ec_point(&[7; 31]), None);
    }
}
