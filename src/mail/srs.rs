//! Sender Rewriting Scheme (SRS0/SRS1, the scheme of libsrs2 as used by
//! Postfix's postsrsd and by Exim).
//!
//! A forwarded message leaves with an envelope sender in the alias domain, so
//! SPF at the target checks the alias domain (which lists our nodes) instead
//! of the original sender's domain (which does not). The rewritten address
//! carries the original sender, a day stamp and an HMAC, so a bounce to it
//! can be returned to the original sender, and nobody without the key can
//! make a node send mail to an address of their choosing:
//!
//! ```text
//! SRS0=HHHHHH=TT=orig-domain=orig-local@alias-domain
//! SRS1=HHHHHH=first-forwarder==HHHH=TT=orig-domain=orig-local@alias-domain
//! ```
//!
//! `HHHHHH` is the start of the base64 HMAC-SHA1 of the lower-cased fields,
//! each after its length (`TT`, domain, local part for SRS0; forwarder and
//! the rest for SRS1), `TT`
//! the day number modulo 1024 in base32. Hashes compare case-insensitively
//! and the fields are hashed lower-cased, because MTAs on the way may change
//! the case of a local part (libsrs2 does the same). A sender that is already
//! an SRS0 address of another forwarder becomes SRS1 (pointing back at that
//! forwarder), so addresses do not grow with each hop.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Characters of the HMAC kept in an address. libsrs2 keeps 4 (24 bits);
/// 6 (36 bits; about 31 once case is ignored) makes guessing a hash by RCPT
/// hopeless even across many client addresses.
pub const HASH_LENGTH: usize = 6;

/// Seconds per day stamp.
const DAY_SECS: u64 = 86_400;

/// Day stamps wrap after this many days (two base32 characters).
const TIME_SLOTS: u64 = 1024;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Why an address could not be reversed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    /// Not of the SRS0/SRS1 shape at all.
    #[error("not an SRS address")]
    NotSrs,
    /// SRS-shaped, but a field is missing or malformed.
    #[error("malformed SRS address")]
    Malformed,
    /// The hash does not match: forged or altered.
    #[error("SRS hash does not match")]
    BadHash,
    /// The day stamp is older than the allowed age (or in the future).
    #[error("SRS address expired")]
    Expired,
    /// Mail to an SRS address with a sender: only bounces are returned.
    #[error("only bounces (null sender) are accepted for SRS addresses")]
    NotBounce,
}

/// Rewrites senders and reverses SRS addresses with a set of keys.
#[derive(Clone)]
pub struct Srs {
    /// The first key signs; all of them verify (the others are previous keys
    /// kept for a rotation, see docs/operations.md).
    keys: Vec<Vec<u8>>,
    /// How many days a rewritten address can be reversed.
    max_age_days: u64,
}

impl std::fmt::Debug for Srs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srs")
            .field("keys", &self.keys.len())
            .field("max_age_days", &self.max_age_days)
            .finish()
    }
}

/// What kind of SRS address a local part is, if any.
fn srs_kind(local: &str) -> Option<u8> {
    let b = local.as_bytes();
    if b.len() > 5 && b[..3].eq_ignore_ascii_case(b"SRS") && b"=+-".contains(&b[4]) {
        match b[3] {
            b'0' => return Some(0),
            b'1' => return Some(1),
            _ => {}
        }
    }
    None
}

/// True when `local` looks like an SRS local part (so it is never an alias id).
pub fn is_srs(local: &str) -> bool {
    srs_kind(local).is_some()
}

impl Srs {
    /// `keys[0]` signs new addresses; every key is accepted when reversing.
    ///
    /// # Panics
    /// Never; an empty key list is replaced by nothing usable only in tests,
    /// so callers pass at least one key (the configuration guarantees it).
    pub fn new(keys: Vec<Vec<u8>>, max_age_days: u32) -> Self {
        Self {
            keys,
            max_age_days: u64::from(max_age_days),
        }
    }

    /// Each field is hashed after its length (8 bytes, big-endian), so the
    /// input names where one field ends: fields hashed back to back would
    /// make `=example.com=alice` and `=example.co=malice` the same input,
    /// and one valid address would vouch for the other. (libsrs2 hashes them
    /// back to back; no other forwarder needs to verify our hashes, each
    /// reverses only its own addresses.)
    fn hash_with(key: &[u8], fields: &[&str]) -> String {
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        for f in fields {
            let f = f.to_ascii_lowercase();
            mac.update(&(f.len() as u64).to_be_bytes());
            mac.update(f.as_bytes());
        }
        let digest = mac.finalize().into_bytes();
        let mut s = base64::engine::general_purpose::STANDARD.encode(digest);
        s.truncate(HASH_LENGTH);
        s
    }

    fn hash(&self, fields: &[&str]) -> String {
        Self::hash_with(self.keys.first().map(Vec::as_slice).unwrap_or(&[]), fields)
    }

    fn check_hash(&self, hash: &str, fields: &[&str]) -> Result<(), SrsError> {
        if hash.len() != HASH_LENGTH {
            return Err(SrsError::BadHash);
        }
        let ok = self.keys.iter().any(|k| {
            let expected = Self::hash_with(k, fields);
            // Constant-time over the fixed length; case-insensitive.
            expected.bytes().zip(hash.bytes()).fold(0u8, |acc, (a, b)| {
                acc | (a.to_ascii_lowercase() ^ b.to_ascii_lowercase())
            }) == 0
        });
        if ok {
            Ok(())
        } else {
            Err(SrsError::BadHash)
        }
    }

    fn stamp(now_secs: u64) -> String {
        let day = (now_secs / DAY_SECS) % TIME_SLOTS;
        let hi = BASE32[((day >> 5) & 31) as usize] as char;
        let lo = BASE32[(day & 31) as usize] as char;
        format!("{hi}{lo}")
    }

    fn check_stamp(&self, stamp: &str, now_secs: u64) -> Result<(), SrsError> {
        let digit = |c: u8| {
            BASE32
                .iter()
                .position(|&b| b == c.to_ascii_uppercase())
                .map(|p| p as u64)
        };
        let b = stamp.as_bytes();
        if b.len() != 2 {
            return Err(SrsError::Malformed);
        }
        let (Some(hi), Some(lo)) = (digit(b[0]), digit(b[1])) else {
            return Err(SrsError::Malformed);
        };
        let then = (hi << 5) | lo;
        let mut now = (now_secs / DAY_SECS) % TIME_SLOTS;
        // A stamp "after" today is one from before the last wrap: very old.
        if now < then {
            now += TIME_SLOTS;
        }
        if now <= then + self.max_age_days {
            Ok(())
        } else {
            Err(SrsError::Expired)
        }
    }

    /// The envelope sender for forwarding `sender` from `alias_domain`.
    /// The null sender stays null (bounces are never rewritten). An address
    /// without `@` is returned unchanged: the session accepts none.
    pub fn forward(&self, sender: &str, alias_domain: &str, now_secs: u64) -> String {
        let Some((local, domain)) = sender.rsplit_once('@') else {
            return sender.to_string();
        };
        match srs_kind(local) {
            Some(0) => {
                // Another forwarder's SRS0: point back at that forwarder.
                let user = &local[4..];
                let hash = self.hash(&[domain, user]);
                format!("SRS1={hash}={domain}={user}@{alias_domain}")
            }
            Some(_) => {
                // SRS1: keep its first forwarder and the rest, re-sign.
                let rest = &local[5..];
                if let Some((_, after_hash)) = rest.split_once('=') {
                    if let Some((host, user)) = after_hash.split_once('=') {
                        let hash = self.hash(&[host, user]);
                        return format!("SRS1={hash}={host}={user}@{alias_domain}");
                    }
                }
                self.srs0(local, domain, alias_domain, now_secs)
            }
            None => self.srs0(local, domain, alias_domain, now_secs),
        }
    }

    fn srs0(&self, local: &str, domain: &str, alias_domain: &str, now_secs: u64) -> String {
        let stamp = Self::stamp(now_secs);
        let hash = self.hash(&[&stamp, domain, local]);
        format!("SRS0={hash}={stamp}={domain}={local}@{alias_domain}")
    }

    /// The address a bounce to the SRS local part `local` must go to.
    ///
    /// # Errors
    /// [`SrsError::NotSrs`] when `local` is no SRS address;
    /// [`SrsError::Malformed`], [`SrsError::BadHash`] (forged or altered) or
    /// [`SrsError::Expired`] when it cannot be trusted.
    pub fn reverse(&self, local: &str, now_secs: u64) -> Result<String, SrsError> {
        match srs_kind(local) {
            None => Err(SrsError::NotSrs),
            Some(0) => {
                let mut parts = local[5..].splitn(4, '=');
                let (Some(hash), Some(stamp), Some(domain), Some(user)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(SrsError::Malformed);
                };
                if domain.is_empty() || user.is_empty() {
                    return Err(SrsError::Malformed);
                }
                self.check_hash(hash, &[stamp, domain, user])?;
                self.check_stamp(stamp, now_secs)?;
                Ok(format!("{user}@{domain}"))
            }
            Some(_) => {
                let mut parts = local[5..].splitn(3, '=');
                let (Some(hash), Some(host), Some(user)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(SrsError::Malformed);
                };
                if host.is_empty() || user.len() < 2 {
                    return Err(SrsError::Malformed);
                }
                self.check_hash(hash, &[host, user])?;
                // The first forwarder checks its own SRS0 (and its age).
                Ok(format!("SRS0{user}@{host}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000;
    const DAY: u64 = DAY_SECS;

    fn srs() -> Srs {
        Srs::new(vec![b"first secret key".to_vec()], 21)
    }

    fn local(addr: &str) -> &str {
        addr.rsplit_once('@').unwrap().0
    }

    #[test]
    fn round_trip() {
        let s = srs();
        let fwd = s.forward("Alice.B@Sender.Example", "tempalias.test", NOW);
        assert!(fwd.starts_with("SRS0="), "{fwd}");
        assert!(
            fwd.ends_with("=Sender.Example=Alice.B@tempalias.test"),
            "{fwd}"
        );
        assert_eq!(
            s.reverse(local(&fwd), NOW).unwrap(),
            "Alice.B@Sender.Example"
        );
        // Still valid on the last allowed day, not the day after.
        assert!(s.reverse(local(&fwd), NOW + 21 * DAY).is_ok());
        assert_eq!(
            s.reverse(local(&fwd), NOW + 22 * DAY),
            Err(SrsError::Expired)
        );
    }

    #[test]
    fn null_sender_is_never_rewritten() {
        assert_eq!(srs().forward("", "tempalias.test", NOW), "");
    }

    #[test]
    fn hash_and_stamp_ignore_case_as_libsrs2_does() {
        let s = srs();
        let fwd = s.forward("alice@sender.example", "tempalias.test", NOW);
        let lower = local(&fwd).to_ascii_lowercase();
        assert_eq!(s.reverse(&lower, NOW).unwrap(), "alice@sender.example");
        let upper = local(&fwd).to_ascii_uppercase();
        assert_eq!(s.reverse(&upper, NOW).unwrap(), "ALICE@SENDER.EXAMPLE");
    }

    #[test]
    fn forged_and_altered_addresses_are_refused() {
        let s = srs();
        let fwd = s.forward("alice@sender.example", "tempalias.test", NOW);
        let l = local(&fwd);
        // Another target, same hash and stamp.
        let altered = l.replace("alice", "mallory");
        assert_eq!(s.reverse(&altered, NOW), Err(SrsError::BadHash));
        let altered = l.replace("sender.example", "victim.example");
        assert_eq!(s.reverse(&altered, NOW), Err(SrsError::BadHash));
        // A stamp moved forward to dodge expiry breaks the hash.
        let stamp = Srs::stamp(NOW);
        let newer = Srs::stamp(NOW + DAY);
        let restamped = l.replace(&format!("={stamp}="), &format!("={newer}="));
        assert_eq!(s.reverse(&restamped, NOW), Err(SrsError::BadHash));
        // Signed with a key we do not have.
        let other = Srs::new(vec![b"attacker's key".to_vec()], 21);
        let forged = other.forward("victim@anywhere.example", "tempalias.test", NOW);
        assert_eq!(s.reverse(local(&forged), NOW), Err(SrsError::BadHash));
        // Crafted by hand.
        for crafted in [
            "SRS0=AAAAAA=AA=anywhere.example=victim",
            "SRS0==AA=anywhere.example=victim",
            "SRS0=AAAA=AA=anywhere.example=victim",
            "SRS1=AAAAAA=anywhere.example==x",
        ] {
            assert!(s.reverse(crafted, NOW).is_err(), "{crafted}");
        }
        for malformed in ["SRS0=abc", "SRS0=abcdef=AA=domain", "SRS1=abcdef=host"] {
            assert_eq!(
                s.reverse(malformed, NOW),
                Err(SrsError::Malformed),
                "{malformed}"
            );
        }
        assert_eq!(s.reverse("k7q2mz9xwd", NOW), Err(SrsError::NotSrs));
    }

    #[test]
    fn fields_cannot_be_shifted_across_a_separator() {
        // The fields are hashed one after the other: without their lengths,
        // "example.com" + "alice" and "example.co" + "malice" would be the
        // same input, and a valid address would vouch for another one.
        let s = srs();
        let fwd = s.forward("alice@example.com", "tempalias.test", NOW);
        let l = local(&fwd);
        assert_eq!(s.reverse(l, NOW).unwrap(), "alice@example.com");
        let shifted = l.replace("=example.com=alice", "=example.co=malice");
        assert_ne!(shifted, l);
        assert_eq!(s.reverse(&shifted, NOW), Err(SrsError::BadHash));
        // SRS1: the first forwarder and the rest.
        let theirs = Srs::new(vec![b"the other forwarder".to_vec()], 21);
        let first = theirs.forward("alice@sender.example", "fwd.example", NOW);
        let second = s.forward(&first, "tempalias.test", NOW);
        let l1 = local(&second);
        let shifted1 = l1.replace("=fwd.example==", "=fwd.exampl=e=");
        assert_ne!(shifted1, l1);
        assert_eq!(s.reverse(&shifted1, NOW), Err(SrsError::BadHash));
    }

    #[test]
    fn future_stamps_count_as_expired() {
        let s = srs();
        let fwd = s.forward("alice@sender.example", "tempalias.test", NOW + 3 * DAY);
        assert_eq!(s.reverse(local(&fwd), NOW), Err(SrsError::Expired));
    }

    #[test]
    fn stamps_wrap_after_1024_days() {
        let s = srs();
        // Issued on the last day of a 1024-day cycle, reversed after the wrap.
        let issued = (NOW / DAY / TIME_SLOTS + 1) * TIME_SLOTS * DAY - DAY;
        let fwd = s.forward("a@b.example", "tempalias.test", issued);
        assert!(s.reverse(local(&fwd), issued + 5 * DAY).is_ok());
        assert_eq!(
            s.reverse(local(&fwd), issued + 30 * DAY),
            Err(SrsError::Expired)
        );
    }

    #[test]
    fn srs0_of_another_forwarder_becomes_srs1_and_reverses_to_it() {
        let theirs = Srs::new(vec![b"the other forwarder".to_vec()], 21);
        let first = theirs.forward("alice@sender.example", "fwd.example", NOW);
        let s = srs();
        let second = s.forward(&first, "tempalias.test", NOW);
        assert!(second.starts_with("SRS1="), "{second}");
        assert!(second.contains("=fwd.example==") && second.ends_with("@tempalias.test"));
        // Our bounce goes back to the first forwarder, which reverses its own.
        let back = s.reverse(local(&second), NOW).unwrap();
        assert_eq!(back, first);
        assert_eq!(
            theirs.reverse(local(&back), NOW).unwrap(),
            "alice@sender.example"
        );
        // An SRS1 sender is re-signed with our key, keeping the first forwarder.
        let third = Srs::new(vec![b"a third key".to_vec()], 21);
        let again = third.forward(&second, "third.example", NOW);
        assert!(again.starts_with("SRS1=") && again.contains("=fwd.example=="));
        assert_eq!(third.reverse(local(&again), NOW).unwrap(), first);
        // Our SRS1 with its forwarder changed is refused.
        let altered = local(&second).replace("fwd.example", "victim.example");
        assert_eq!(s.reverse(&altered, NOW), Err(SrsError::BadHash));
    }

    #[test]
    fn previous_keys_still_reverse_during_a_rotation() {
        let old = Srs::new(vec![b"old key".to_vec()], 21);
        let fwd = old.forward("alice@sender.example", "tempalias.test", NOW);
        let rotated = Srs::new(vec![b"new key".to_vec(), b"old key".to_vec()], 21);
        assert_eq!(
            rotated.reverse(local(&fwd), NOW).unwrap(),
            "alice@sender.example"
        );
        let new_only = Srs::new(vec![b"new key".to_vec()], 21);
        assert_eq!(new_only.reverse(local(&fwd), NOW), Err(SrsError::BadHash));
        // New addresses use the first key.
        let fresh = rotated.forward("alice@sender.example", "tempalias.test", NOW);
        assert!(new_only.reverse(local(&fresh), NOW).is_ok());
    }

    #[test]
    fn other_separators_are_recognised() {
        assert!(is_srs("SRS0+abc"));
        assert!(is_srs("srs1-abc"));
        assert!(!is_srs("SRS2=abc"));
        assert!(!is_srs("srs0"));
        assert!(!is_srs("k7q2mz9xwd"));
    }
}
