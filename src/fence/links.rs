//! Key links: the validator key appears in the node's home only as a
//! symlink keyraft made, swapped atomically (a new link beside, renamed
//! over, the directory fsynced).
//!
//! Must not: decide when to link; the coordinator does.

use std::path::Path;

use super::{io, FenceError};
use crate::config::KeyLink;

fn fsync_dir(dir: &Path) -> Result<(), FenceError> {
    crate::durable::fsync_dir(dir).map_err(io("cannot fsync", dir))
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

/// Makes `dst` a symlink to `src` atomically: a new link beside it, renamed
/// over it, the directory fsynced.
fn link(src: &Path, dst: &Path) -> Result<(), FenceError> {
    let dir = parent(dst);
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.keyraft-new"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(src, &tmp).map_err(io("cannot create link", &tmp))?;
    std::fs::rename(&tmp, dst).map_err(io("cannot rename link over", dst))?;
    fsync_dir(dir)
}

/// Removes `dst` if it is a symlink. Anything else at a key path is
/// refused (fail closed): a regular file there, even a copy of the key, is
/// a key a node could sign with outside keyraft's fence.
fn unlink(l: &KeyLink) -> Result<bool, FenceError> {
    let meta = match std::fs::symlink_metadata(&l.dst) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("cannot inspect", &l.dst)(e)),
    };
    if !meta.file_type().is_symlink() {
        return Err(FenceError::NotOurLink {
            path: l.dst.display().to_string(),
            kind: if meta.is_file() {
                "regular file"
            } else {
                "directory or special file"
            },
        });
    }
    std::fs::remove_file(&l.dst).map_err(io("cannot remove", &l.dst))?;
    fsync_dir(parent(&l.dst))?;
    Ok(true)
}

/// The key links of one validator: `active` exist only while validating,
/// `standby` only while not.
#[derive(Debug, Clone)]
pub struct KeyLinks {
    pub active: Vec<KeyLink>,
    pub standby: Vec<KeyLink>,
}

impl KeyLinks {
    /// Standing by: every active link removed, standby links in place.
    pub fn stand_by(&self) -> Result<(), FenceError> {
        for l in &self.active {
            if unlink(l)? {
                tracing::info!("unlinked {}", l.dst.display());
            }
        }
        for l in &self.standby {
            link(&l.src, &l.dst)?;
        }
        Ok(())
    }

    /// Validating: every active link in place (replacing standby links).
    pub fn activate(&self) -> Result<(), FenceError> {
        for l in &self.active {
            link(&l.src, &l.dst)?;
            tracing::info!("linked {} -> {}", l.dst.display(), l.src.display());
        }
        Ok(())
    }

    /// Whether any active link currently points at its key.
    pub fn any_linked(&self) -> bool {
        self.active
            .iter()
            .any(|l| std::fs::read_link(&l.dst).is_ok_and(|t| t == l.src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_swap_atomically_and_only_keyraft_links_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        let voter = dir.path().join("voter.json");
        std::fs::write(&key, "secret").unwrap();
        std::fs::write(&voter, "voter").unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let links = KeyLinks {
            active: vec![
                KeyLink {
                    src: key.clone(),
                    dst: home.join("validator_key.json"),
                },
                KeyLink {
                    src: key.clone(),
                    dst: home.join("node_key.json"),
                },
            ],
            standby: vec![KeyLink {
                src: voter.clone(),
                dst: home.join("node_key.json"),
            }],
        };
        links.activate().unwrap();
        assert!(links.any_linked());
        assert_eq!(std::fs::read_link(home.join("node_key.json")).unwrap(), key);
        links.stand_by().unwrap();
        assert!(!links.any_linked());
        assert!(!home.join("validator_key.json").exists());
        assert_eq!(
            std::fs::read_link(home.join("node_key.json")).unwrap(),
            voter
        );
        // A regular file at a key path, a copy of the key or not, is refused
        // and left as it was (nothing the operator wrote is lost).
        for content in ["something else", "secret"] {
            std::fs::write(home.join("validator_key.json"), content).unwrap();
            let err = links.stand_by().unwrap_err().to_string();
            assert!(err.contains("not a link keyraft made"), "{err}");
            assert_eq!(
                std::fs::read_to_string(home.join("validator_key.json")).unwrap(),
                content
            );
            std::fs::remove_file(home.join("validator_key.json")).unwrap();
        }
    }
}
