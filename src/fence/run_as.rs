//! `--validator-user` as the guard applies it: the user looked up once
//! (never root), with its supplementary groups, for the validator's
//! `setgroups`, `setgid` and `setuid` between fork and exec.
//!
//! Owns: the lookup. Must not: choose the group a keyed validator runs
//! with (the kernel fence's plan does) or change any credentials itself.

use crate::config::ValidatorUser;

/// The validator's user, looked up once, with its supplementary groups.
pub(super) struct RunAs {
    pub user: ValidatorUser,
    pub groups: Vec<libc::gid_t>,
}

impl RunAs {
    pub fn look_up(name: &str) -> std::io::Result<RunAs> {
        let no = |why: String| std::io::Error::other(format!("--validator-user {name}: {why}"));
        let u = nix::unistd::User::from_name(name)
            .map_err(|e| no(e.to_string()))?
            .ok_or_else(|| no("no such user".into()))?;
        if u.uid.is_root() {
            return Err(no("is root".into()));
        }
        let cname = std::ffi::CString::new(name).map_err(|e| no(e.to_string()))?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .map_err(|e| no(e.to_string()))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(RunAs {
            user: ValidatorUser {
                name: name.to_string(),
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            },
            groups,
        })
    }
}
