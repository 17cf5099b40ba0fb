//! Alias identifiers, management tokens and e-mail address syntax.
//!
//! Ids are what a stranger sees in an address, so they come from the operating
//! system's cryptographic RNG and carry well over the 50 bits of randomness the
//! design requires; otherwise aliases could be enumerated. Tokens prove ownership
//! of an alias and only their SHA-256 is replicated, so a copied data directory
//! does not hand out management rights.

use rand::{Rng, TryRngCore};
use sha2::{Digest, Sha256};

/// Characters of an alias id: lower-case letters and digits.
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// 12 characters over 36 symbols: 12 * log2(36) ≈ 62 bits of randomness.
pub const ID_LEN: usize = 12;

/// Returns a new random alias id.
///
/// The symbols come from one read of the OS RNG (a system call per read, so
/// not one per symbol: that was 12 of a create's 13 `getrandom` calls), mapped
/// without bias by rejection: a byte stands for `byte % 36` only below 252
/// (7 × 36), so every symbol is equally likely.
pub fn new_id() -> String {
    const LIMIT: u8 = (256 / ID_ALPHABET.len() * ID_ALPHABET.len()) as u8;
    let mut rng = rand::rngs::OsRng.unwrap_err();
    let mut id = String::with_capacity(ID_LEN);
    // 32 bytes give the 12 symbols unless more than 20 bytes are rejected
    // (each with p = 4/256); the loop reads again in that case.
    let mut bytes = [0u8; 32];
    while id.len() < ID_LEN {
        rng.fill(&mut bytes);
        for &b in bytes.iter().filter(|&&b| b < LIMIT).take(ID_LEN - id.len()) {
            id.push(ID_ALPHABET[usize::from(b) % ID_ALPHABET.len()] as char);
        }
    }
    id
}

/// True when `s` has the shape of an id we hand out (cheap filter before any lookup).
pub fn is_valid_id(s: &str) -> bool {
    (10..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Returns a new random management token (256 bits, hex encoded).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.unwrap_err().fill(&mut bytes);
    hex::encode(bytes)
}

/// The digest of a token as stored in the replicated state.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares a presented token with a stored digest in constant time.
pub fn token_matches(token: &str, stored_hash: &str) -> bool {
    let presented = token_hash(token);
    if presented.len() != stored_hash.len() {
        return false;
    }
    presented
        .bytes()
        .zip(stored_hash.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address is longer than 254 characters")]
    TooLong,
    #[error("address must contain exactly one '@' between a local part and a domain")]
    NoAt,
    #[error("local part must be 1 to 64 characters of letters, digits and !#$%&'*+-/=?^_`{{|}}~ separated by single dots")]
    BadLocalPart,
    #[error("domain must be a host name with at least two labels of letters, digits and hyphens")]
    BadDomain,
}

/// A mailbox `local@domain` whose domain is lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
}

impl std::fmt::Display for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// Checks a domain name: labels of 1..=63 letters, digits and inner hyphens.
pub fn is_valid_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    domain.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Parses a plain `local@domain` address (dot-atom local part; no quoted strings,
/// comments or address literals: none of those is needed for a forwarding target,
/// and refusing them keeps header and envelope handling simple and safe).
///
/// # Errors
/// An [`AddressError`] saying which part is wrong.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, AddressError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    if s.len() > 254 {
        return Err(AddressError::TooLong);
    }
    let (local, domain) = s.rsplit_once('@').ok_or(AddressError::NoAt)?;
    if local.contains('@') {
        return Err(AddressError::NoAt);
    }
    if local.is_empty()
        || local.len() > 64
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
        || !local.bytes().all(|b| b == b'.' || is_atext(b))
    {
        return Err(AddressError::BadLocalPart);
    }
    let domain = domain.to_ascii_lowercase();
    if !is_valid_domain(&domain) {
        return Err(AddressError::BadDomain);
    }
    Ok(Mailbox {
        local: local.to_string(),
        domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_long_random_and_well_formed() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), ID_LEN);
        assert!(is_valid_id(&a));
        assert_ne!(a, b);
        // 62 bits: the alphabet and length give at least 50 bits.
        assert!((ID_LEN as f64) * (ID_ALPHABET.len() as f64).log2() >= 50.0);
    }

    #[test]
    fn ids_use_the_whole_alphabet() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.extend(new_id().bytes());
        }
        assert_eq!(seen.len(), ID_ALPHABET.len());
    }

    #[test]
    fn id_symbols_are_uniform() {
        // 60,000 symbols; a chi-square over 36 symbols (35 degrees of
        // freedom) above 80 has p < 1e-4 for a uniform draw. `byte % 36`
        // without the rejection would give about 117 here.
        let mut counts = [0u32; 36];
        for _ in 0..5_000 {
            for b in new_id().bytes() {
                let i = ID_ALPHABET.iter().position(|&c| c == b).unwrap();
                counts[i] += 1;
            }
        }
        let expected = f64::from(counts.iter().sum::<u32>()) / 36.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 80.0, "chi-square {chi2:.1}: {counts:?}");
    }

    #[test]
    fn id_shape_check() {
        assert!(!is_valid_id("short"));
        assert!(!is_valid_id("UPPERCASEID1"));
        assert!(!is_valid_id("with-dash-123"));
        assert!(is_valid_id("abcdefghij"));
    }

    #[test]
    fn tokens_hash_and_compare() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        let h = token_hash(&t);
        assert!(token_matches(&t, &h));
        assert!(!token_matches(&new_token(), &h));
        assert!(!token_matches(&t, "short"));
    }

    #[test]
    fn parses_good_addresses() {
        let m = parse_mailbox("First.Last+tag@Example.NET").unwrap();
        assert_eq!(m.local, "First.Last+tag");
        assert_eq!(m.domain, "example.net");
        assert_eq!(m.to_string(), "First.Last+tag@example.net");
    }

    #[test]
    fn refuses_bad_addresses() {
        assert_eq!(parse_mailbox(""), Err(AddressError::Empty));
        assert_eq!(parse_mailbox("nobody"), Err(AddressError::NoAt));
        assert_eq!(parse_mailbox("a@b@c.d"), Err(AddressError::NoAt));
        assert_eq!(parse_mailbox("@x.org"), Err(AddressError::BadLocalPart));
        assert_eq!(parse_mailbox("a..b@x.org"), Err(AddressError::BadLocalPart));
        assert_eq!(parse_mailbox("a b@x.org"), Err(AddressError::BadLocalPart));
        assert_eq!(parse_mailbox("a@localhost"), Err(AddressError::BadDomain));
        assert_eq!(parse_mailbox("a@-x.org"), Err(AddressError::BadDomain));
        assert_eq!(parse_mailbox("a@x_y.org"), Err(AddressError::BadDomain));
        let long = format!("{}@x.org", "a".repeat(65));
        assert_eq!(parse_mailbox(&long), Err(AddressError::BadLocalPart));
        let huge = format!("a@{}.org", "b".repeat(260));
        assert_eq!(parse_mailbox(&huge), Err(AddressError::TooLong));
    }
}
