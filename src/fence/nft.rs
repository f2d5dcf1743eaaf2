//! A minimal nftables client over netlink (NETLINK_NETFILTER), for the few
//! messages the kernel fence sends while a validator runs: write a set
//! element with a timeout, add one, flush a set, list a set's elements or
//! count a chain's rules, delete a table. Each write is one batch, atomic in the
//! kernel, acknowledged message by message; no process is spawned.
//!
//! Building rules is left to `nft -f` at start ([`super::kernel`]): it is
//! done once, and `nft` checks what it is given.
//!
//! Must not: decide anything; it writes what it is told and reports the
//! kernel's answer, and a request that gets no answer within a second is
//! an error.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_INET: u8 = 1;

const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// How long the kernel may take to answer one request.
const ANSWER: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("nftables refused {what}: {source}")]
    Refused {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("nftables did not answer {0} within a second")]
    Timeout(&'static str),
    #[error("malformed netlink answer to {0}")]
    Malformed(&'static str),
}

/// One netlink socket to the kernel's nftables, owned by one thread.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// Appends one attribute (header, payload, padding to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// A NUL-terminated string attribute.
fn attr_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(buf, kind, &v);
}

/// A nested attribute whose contents `f` writes.
fn nested(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    attr(buf, kind | NLA_F_NESTED, &inner);
}

/// The attributes naming a set, and optionally one element of it.
fn set_elems(table: &str, set: &str, elem: Option<(&[u8], Option<u64>)>) -> Vec<u8> {
    let mut a = Vec::new();
    attr_str(&mut a, NFTA_SET_ELEM_LIST_TABLE, table);
    attr_str(&mut a, NFTA_SET_ELEM_LIST_SET, set);
    if let Some((key, timeout_ms)) = elem {
        nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
            nested(l, NFTA_LIST_ELEM, |e| {
                nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, key));
                if let Some(ms) = timeout_ms {
                    attr(e, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                }
            });
        });
    }
    a
}

/// One message: header, nfgenmsg, attributes.
fn message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// One netlink message of an answer: type, sequence number, payload.
struct Answer<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

fn parse(buf: &[u8]) -> Option<Vec<Answer<'_>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().ok()?) as usize;
        if len < 16 || at + len > buf.len() {
            return None;
        }
        out.push(Answer {
            kind: u16::from_ne_bytes(buf[at + 4..at + 6].try_into().ok()?),
            seq: u32::from_ne_bytes(buf[at + 8..at + 12].try_into().ok()?),
            payload: &buf[at + 16..at + len],
        });
        at += len.next_multiple_of(4);
    }
    Some(out)
}

/// The attributes at the top level of `buf`, as (type without flags, payload).
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & !NLA_F_NESTED;
        if len < 4 || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at + 4..at + len]));
        at += len.next_multiple_of(4);
    }
    out
}

impl Netlink {
    pub fn open() -> Result<Netlink, NftError> {
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: ANSWER.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval that outlives the call.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        Ok(Netlink { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send(&self, buf: &[u8]) -> Result<(), NftError> {
        // SAFETY: a zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `buf` and `to` outlive the call; lengths are theirs.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], what: &'static str) -> Result<usize, NftError> {
        // SAFETY: `buf` is writable for its length.
        let r = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    NftError::Timeout(what)
                }
                _ => NftError::Socket(e),
            });
        }
        Ok(r as usize)
    }

    /// Sends `msgs` (type, extra flags, attributes) as one atomic batch and
    /// waits for every acknowledgement.
    fn batch(&mut self, what: &'static str, msgs: &[(u16, u16, Vec<u8>)]) -> Result<(), NftError> {
        let mut buf = Vec::new();
        let begin = self.next_seq();
        message(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let mut pending = Vec::new();
        for (kind, flags, a) in msgs {
            let seq = self.next_seq();
            pending.push(seq);
            message(
                &mut buf,
                nft_type(*kind),
                NLM_F_REQUEST | NLM_F_ACK | flags,
                seq,
                NFPROTO_INET,
                0,
                a,
            );
        }
        let end = self.next_seq();
        message(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.send(&buf)?;
        let mut rx = vec![0u8; 8192];
        while !pending.is_empty() {
            let n = self.recv(&mut rx, what)?;
            for a in parse(&rx[..n]).ok_or(NftError::Malformed(what))? {
                if a.kind != NLMSG_ERROR || a.payload.len() < 4 {
                    continue;
                }
                let code =
                    i32::from_ne_bytes([a.payload[0], a.payload[1], a.payload[2], a.payload[3]]);
                if code != 0 {
                    return Err(NftError::Refused {
                        what,
                        source: std::io::Error::from_raw_os_error(-code),
                    });
                }
                pending.retain(|&s| s != a.seq);
            }
        }
        Ok(())
    }

    /// A dump request; returns each answer's attributes (after nfgenmsg).
    fn dump(&mut self, what: &'static str, kind: u16, a: &[u8]) -> Result<Vec<Vec<u8>>, NftError> {
        let seq = self.next_seq();
        let mut buf = Vec::new();
        message(
            &mut buf,
            nft_type(kind),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
            a,
        );
        self.send(&buf)?;
        let mut rx = vec![0u8; 65536];
        let mut out = Vec::new();
        loop {
            let n = self.recv(&mut rx, what)?;
            for ans in parse(&rx[..n]).ok_or(NftError::Malformed(what))? {
                if ans.seq != seq {
                    continue;
                }
                match ans.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let p = ans.payload;
                        let code = p
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or(NftError::Malformed(what))?;
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(NftError::Refused {
                            what,
                            source: std::io::Error::from_raw_os_error(-code),
                        });
                    }
                    _ => out.push(ans.payload.get(4..).unwrap_or_default().to_vec()),
                }
            }
        }
    }

    /// Makes `key` the set's only element, expiring after `timeout_ms`
    /// (none: it stays): create it if missing, then flush and re-add, in
    /// one batch, so there is no instant without an element and no stale
    /// timeout survives.
    pub fn put_only(
        &mut self,
        table: &str,
        set: &str,
        key: &[u8],
        timeout_ms: Option<u64>,
    ) -> Result<(), NftError> {
        self.batch(
            "a set element",
            &[
                (NFT_MSG_DELSETELEM, 0, set_elems(table, set, None)),
                (
                    NFT_MSG_NEWSETELEM,
                    NLM_F_CREATE,
                    set_elems(table, set, Some((key, timeout_ms))),
                ),
            ],
        )
    }

    /// Empties the set.
    pub fn flush(&mut self, table: &str, set: &str) -> Result<(), NftError> {
        self.batch(
            "a set flush",
            &[(NFT_MSG_DELSETELEM, 0, set_elems(table, set, None))],
        )
    }

    /// Adds one element (no timeout) beside those the set holds.
    pub fn add(&mut self, table: &str, set: &str, key: &[u8]) -> Result<(), NftError> {
        self.batch(
            "a set element",
            &[(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                set_elems(table, set, Some((key, None))),
            )],
        )
    }

    /// The keys of the live (unexpired) elements the set holds.
    pub fn elements(&mut self, table: &str, set: &str) -> Result<Vec<Vec<u8>>, NftError> {
        let answers = self.dump(
            "a set listing",
            NFT_MSG_GETSETELEM,
            &set_elems(table, set, None),
        )?;
        let within = |buf: &[u8], kind: u16| -> Vec<Vec<u8>> {
            attrs(buf)
                .into_iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, v)| v.to_vec())
                .collect()
        };
        Ok(answers
            .iter()
            .flat_map(|a| within(a, NFTA_SET_ELEM_LIST_ELEMENTS))
            .flat_map(|list| within(&list, NFTA_LIST_ELEM))
            .map(|elem| {
                within(&elem, NFTA_SET_ELEM_KEY)
                    .first()
                    .and_then(|k| within(k, NFTA_DATA_VALUE).into_iter().next())
                    .unwrap_or_default()
            })
            .collect())
    }

    /// How many live (unexpired) elements the set holds.
    pub fn count_elements(&mut self, table: &str, set: &str) -> Result<usize, NftError> {
        Ok(self.elements(table, set)?.len())
    }

    /// How many rules the chain holds.
    pub fn count_rules(&mut self, table: &str, chain: &str) -> Result<usize, NftError> {
        let mut a = Vec::new();
        attr_str(&mut a, NFTA_RULE_TABLE, table);
        attr_str(&mut a, NFTA_RULE_CHAIN, chain);
        let answers = self.dump("a rule listing", NFT_MSG_GETRULE, &a)?;
        // A dump filtered by table and chain answers with its rules only.
        Ok(answers.len())
    }

    /// Deletes the table and everything in it.
    pub fn delete_table(&mut self, table: &str) -> Result<(), NftError> {
        let mut a = Vec::new();
        attr_str(&mut a, NFTA_TABLE_NAME, table);
        self.batch("a table deletion", &[(NFT_MSG_DELTABLE, 0, a)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_parsed_back() {
        let mut buf = Vec::new();
        attr_str(&mut buf, 1, "keyraft");
        nested(&mut buf, 3, |n| attr(n, 1, &7u64.to_be_bytes()));
        assert_eq!(buf.len() % 4, 0);
        let got = attrs(&buf);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (1, &b"keyraft\0"[..]));
        assert_eq!(got[1].0, 3);
        assert_eq!(attrs(got[1].1), vec![(1, &7u64.to_be_bytes()[..])]);
    }

    #[test]
    fn a_truncated_answer_is_refused() {
        let mut buf = Vec::new();
        message(&mut buf, NLMSG_DONE, 0, 9, 0, 0, &[1, 2, 3, 4]);
        assert_eq!(parse(&buf).map(|a| a.len()), Some(1));
        buf.truncate(buf.len() - 2);
        assert!(parse(&buf).is_none());
    }
}
