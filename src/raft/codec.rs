//! The record every file of the Raft store is a sequence of: its body's
//! length, a CRC-32 of its head and body, a fixed-size head, the body.
//!
//! A record cut short by a crash, or one whose bytes do not check, ends
//! the readable part of a file: what follows it is a torn last write.
//!
//! Owns: the record's bytes. Must not: know what a body means, or touch a
//! file.

/// Bytes before a record's head: its body's length and its CRC-32.
pub(super) const PREFIX: usize = 8;

/// Largest body a record may hold: a length beyond it is a torn prefix.
const MAX_BODY: usize = 64 << 20;

/// A body longer than a record can hold.
#[derive(Debug, thiserror::Error)]
#[error("a record of {0} bytes is longer than a record may be")]
pub(super) struct TooLong(usize);

/// Appends the record of `head` and `body` to `out`; returns its length.
pub(super) fn put<const H: usize>(
    out: &mut Vec<u8>,
    head: [u8; H],
    body: &[u8],
) -> Result<u64, TooLong> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|_| body.len() <= MAX_BODY)
        .ok_or(TooLong(body.len()))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(body);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    Ok((PREFIX + H + body.len()) as u64)
}

/// The record at the start of `bytes`: its head, its body and its whole
/// length; `None` if it is cut short or does not check.
pub(super) fn take<const H: usize>(bytes: &[u8]) -> Option<([u8; H], &[u8], usize)> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let len = word(0)? as usize;
    // An empty record's CRC-32 is 0: zeros a crash left would check.
    if len > MAX_BODY || H + len == 0 {
        return None;
    }
    let head: [u8; H] = bytes.get(PREFIX..PREFIX + H)?.try_into().ok()?;
    let body = bytes.get(PREFIX + H..PREFIX + H + len)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(body);
    (crc.finalize() == word(4)?).then_some((head, body, PREFIX + H + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_cut_or_changed_one_does_not() {
        let mut bytes = Vec::new();
        let len = put(&mut bytes, 7u64.to_le_bytes(), b"hello").expect("put");
        assert_eq!(len as usize, bytes.len());
        let (head, body, read) = take::<8>(&bytes).expect("reads back");
        assert_eq!(
            (u64::from_le_bytes(head), body, read),
            (7, &b"hello"[..], bytes.len())
        );
        for cut in 0..bytes.len() {
            assert!(take::<8>(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut changed = bytes.clone();
        *changed.last_mut().expect("a byte") ^= 1;
        assert!(take::<8>(&changed).is_none());
        assert!(
            take::<8>(&[0xff; 32]).is_none(),
            "a length beyond any record"
        );
    }
}
