//! A PKCS#11 module for the tests: SoftHSM2's own, except that while the
//! file `hang` exists beside the caller's `$SOFTHSM2_CONF`, the calls that
//! reach the token (its info, opening and closing a session, logging in,
//! finding objects, signing) wait until the file is gone; while the file
//! `hang-init` exists, so does `C_Initialize` (a module that does not load,
//! as one whose HSM daemon is wedged). A token that stops answering, as a
//! wedged USB HSM does, which SoftHSM2 cannot be made to do from outside.
//!
//! Built by the harness with `rustc` alone (`localnet::token::hanging_module`),
//! so it has no dependencies: the few PKCS#11 types it needs are written
//! here. Every other call goes to SoftHSM2 through SoftHSM2's own function
//! list.
//!
//! Owns: the waiting and the forwarding. Must not: change an answer.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

type Rv = u64;
type Ulong = u64;
type Fp = Option<unsafe extern "C" fn()>;

const SOFTHSM: &[u8] = b"/usr/lib/softhsm/libsofthsm2.so\0";
const RTLD_NOW: c_int = 2;
const CKR_GENERAL_ERROR: Rv = 5;
const CKR_OK: Rv = 0;

/// PKCS#11 2.40's function list: a version, then 68 functions in the
/// standard's order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct List {
    version: [u8; 2],
    f: [Fp; 68],
}

// Positions in the list.
const INITIALIZE: usize = 0;
const GET_TOKEN_INFO: usize = 6;
const OPEN_SESSION: usize = 12;
const CLOSE_SESSION: usize = 13;
const LOGIN: usize = 18;
const FIND_OBJECTS_INIT: usize = 26;
const SIGN_INIT: usize = 42;
const SIGN: usize = 43;

extern "C" {
    fn dlopen(file: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

struct Lists {
    real: List,
    ours: List,
}

static LISTS: OnceLock<Option<Lists>> = OnceLock::new();

fn lists() -> Option<&'static Lists> {
    LISTS
        .get_or_init(|| unsafe {
            let lib = dlopen(SOFTHSM.as_ptr().cast(), RTLD_NOW);
            if lib.is_null() {
                return None;
            }
            let sym = dlsym(lib, b"C_GetFunctionList\0".as_ptr().cast());
            if sym.is_null() {
                return None;
            }
            let get: unsafe extern "C" fn(*mut *const List) -> Rv = std::mem::transmute(sym);
            let mut real: *const List = std::ptr::null();
            if get(&mut real) != CKR_OK || real.is_null() {
                return None;
            }
            let real = *real;
            let mut ours = real;
            ours.f[INITIALIZE] = std::mem::transmute::<_, Fp>(
                initialize as unsafe extern "C" fn(*mut c_void) -> Rv,
            );
            ours.f[GET_TOKEN_INFO] = std::mem::transmute::<_, Fp>(
                get_token_info as unsafe extern "C" fn(Ulong, *mut c_void) -> Rv,
            );
            ours.f[OPEN_SESSION] = std::mem::transmute::<_, Fp>(
                open_session
                    as unsafe extern "C" fn(
                        Ulong,
                        Ulong,
                        *mut c_void,
                        *mut c_void,
                        *mut Ulong,
                    ) -> Rv,
            );
            ours.f[CLOSE_SESSION] = std::mem::transmute::<_, Fp>(
                close_session as unsafe extern "C" fn(Ulong) -> Rv,
            );
            ours.f[LOGIN] = std::mem::transmute::<_, Fp>(
                login as unsafe extern "C" fn(Ulong, Ulong, *mut u8, Ulong) -> Rv,
            );
            ours.f[FIND_OBJECTS_INIT] = std::mem::transmute::<_, Fp>(
                find_objects_init as unsafe extern "C" fn(Ulong, *mut c_void, Ulong) -> Rv,
            );
            ours.f[SIGN_INIT] = std::mem::transmute::<_, Fp>(
                sign_init as unsafe extern "C" fn(Ulong, *mut c_void, Ulong) -> Rv,
            );
            ours.f[SIGN] = std::mem::transmute::<_, Fp>(
                sign as unsafe extern "C" fn(Ulong, *mut u8, Ulong, *mut u8, *mut Ulong) -> Rv,
            );
            Some(Lists { real, ours })
        })
        .as_ref()
}

/// SoftHSM2's function at `at`, as type `T`.
unsafe fn real<T: Copy>(at: usize) -> Option<T> {
    let f = lists()?.real.f[at]?;
    Some(std::mem::transmute_copy(&f))
}

/// Waits while the file `hang` beside `$SOFTHSM2_CONF` exists.
fn wait_while_hung() {
    wait_while("hang")
}

/// Waits while the file `name` beside `$SOFTHSM2_CONF` exists.
fn wait_while(name: &str) {
    let Some(conf) = std::env::var_os("SOFTHSM2_CONF") else {
        return;
    };
    let flag = PathBuf::from(conf).with_file_name(name);
    while flag.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(out: *mut *const List) -> Rv {
    match lists() {
        Some(l) if !out.is_null() => {
            *out = &l.ours;
            CKR_OK
        }
        _ => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn initialize(args: *mut c_void) -> Rv {
    wait_while("hang-init");
    match real::<unsafe extern "C" fn(*mut c_void) -> Rv>(INITIALIZE) {
        Some(f) => f(args),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn get_token_info(slot: Ulong, info: *mut c_void) -> Rv {
    wait_while_hung();
    match real::<unsafe extern "C" fn(Ulong, *mut c_void) -> Rv>(GET_TOKEN_INFO) {
        Some(f) => f(slot, info),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn open_session(
    slot: Ulong,
    flags: Ulong,
    app: *mut c_void,
    notify: *mut c_void,
    session: *mut Ulong,
) -> Rv {
    wait_while_hung();
    type F = unsafe extern "C" fn(Ulong, Ulong, *mut c_void, *mut c_void, *mut Ulong) -> Rv;
    match real::<F>(OPEN_SESSION) {
        Some(f) => f(slot, flags, app, notify, session),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn close_session(session: Ulong) -> Rv {
    wait_while_hung();
    match real::<unsafe extern "C" fn(Ulong) -> Rv>(CLOSE_SESSION) {
        Some(f) => f(session),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn login(session: Ulong, user: Ulong, pin: *mut u8, len: Ulong) -> Rv {
    wait_while_hung();
    match real::<unsafe extern "C" fn(Ulong, Ulong, *mut u8, Ulong) -> Rv>(LOGIN) {
        Some(f) => f(session, user, pin, len),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn find_objects_init(session: Ulong, template: *mut c_void, n: Ulong) -> Rv {
    wait_while_hung();
    match real::<unsafe extern "C" fn(Ulong, *mut c_void, Ulong) -> Rv>(FIND_OBJECTS_INIT) {
        Some(f) => f(session, template, n),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn sign_init(session: Ulong, mechanism: *mut c_void, key: Ulong) -> Rv {
    wait_while_hung();
    match real::<unsafe extern "C" fn(Ulong, *mut c_void, Ulong) -> Rv>(SIGN_INIT) {
        Some(f) => f(session, mechanism, key),
        None => CKR_GENERAL_ERROR,
    }
}

unsafe extern "C" fn sign(
    session: Ulong,
    data: *mut u8,
    len: Ulong,
    signature: *mut u8,
    signature_len: *mut Ulong,
) -> Rv {
    wait_while_hung();
    type F = unsafe extern "C" fn(Ulong, *mut u8, Ulong, *mut u8, *mut Ulong) -> Rv;
    match real::<F>(SIGN) {
        Some(f) => f(session, data, len, signature, signature_len),
        None => CKR_GENERAL_ERROR,
    }
}
