//! What a recipient address is, decided from the address alone (no store
//! lookup): the one place that maps `RCPT TO` to a kind of recipient.
//!
//! A new kind of address this node answers for (such as SRS-rewritten
//! bounce addresses) is a new [`Recipient`] variant, recognised in
//! [`classify`] and handled in its own arm of `Session::rcpt`.

/// A recipient this node answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// An alias: `id` (lower case), its sub-address `tag` (with its
    /// delimiter, or empty) and the alias domain (lower case).
    Alias {
        id: String,
        tag: String,
        domain: String,
    },
    /// `postmaster` or `postmaster@<alias domain>` (RFC 5321 4.5.1), which
    /// must be accepted; `address` is as the client wrote it.
    Postmaster { address: String },
}

/// Why an address is not one this node answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotOurs {
    /// Not a mail address, or a sub-address with characters we do not put
    /// in a header.
    #[error("bad recipient address syntax")]
    Syntax,
    /// A domain we do not serve: accepting it would make us an open relay.
    #[error("not an alias domain")]
    Relay,
    /// In an alias domain, but cannot be an alias id (no lookup needed).
    #[error("not an alias id")]
    NoSuchId,
}

/// Classifies `address` (without angle brackets).
///
/// `domains` are the alias domains (lower case); `delimiters` the
/// sub-address delimiters (`[smtp] recipient_delimiter`).
pub fn classify(address: &str, domains: &[String], delimiters: &str) -> Result<Recipient, NotOurs> {
    if address.eq_ignore_ascii_case("postmaster") {
        return Ok(Recipient::Postmaster {
            address: "postmaster".to_string(),
        });
    }
    let (local, domain) = address.rsplit_once('@').ok_or(NotOurs::Syntax)?;
    let domain = domain.to_ascii_lowercase();
    if !domains.contains(&domain) {
        return Err(NotOurs::Relay);
    }
    if local.eq_ignore_ascii_case("postmaster") {
        return Ok(Recipient::Postmaster {
            address: format!("postmaster@{domain}"),
        });
    }
    let (bare, tag) = split_subaddress(local, delimiters).ok_or(NotOurs::Syntax)?;
    let id = bare.to_ascii_lowercase();
    if !crate::alias::is_valid_id(&id) {
        return Err(NotOurs::NoSuchId);
    }
    Ok(Recipient::Alias {
        id,
        tag: tag.to_string(),
        domain,
    })
}

/// Splits sub-addressing off a local part: `id+tag` is `("id", "+tag")`
/// when `+` is one of the `delimiters` (the first delimiter found splits, as
/// in Postfix). `None` when the tag holds anything but the characters of a
/// dot-atom (it goes into our `Received:` header) or is over 64 characters.
fn split_subaddress<'a>(local: &'a str, delimiters: &str) -> Option<(&'a str, &'a str)> {
    let Some(at) = local.find(|c| delimiters.contains(c)) else {
        return Some((local, ""));
    };
    let (bare, tag) = local.split_at(at);
    let ok = tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b));
    ok.then_some((bare, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        vec!["tempalias.test".to_string()]
    }

    #[test]
    fn sub_addresses_split_at_the_first_delimiter() {
        assert_eq!(split_subaddress("abc", "+"), Some(("abc", "")));
        assert_eq!(split_subaddress("abc+shop", "+"), Some(("abc", "+shop")));
        assert_eq!(split_subaddress("abc+a+b", "+"), Some(("abc", "+a+b")));
        assert_eq!(split_subaddress("abc-x+y", "+-"), Some(("abc", "-x+y")));
        assert_eq!(split_subaddress("abc+shop", ""), Some(("abc+shop", "")));
        assert_eq!(split_subaddress("abc+a>b", "+"), None);
        assert_eq!(
            split_subaddress(&format!("abc+{}", "x".repeat(64)), "+"),
            None
        );
    }

    #[test]
    fn postmaster_is_recognised_bare_and_in_alias_domains_only() {
        assert_eq!(
            classify("PostMaster", &domains(), "+"),
            Ok(Recipient::Postmaster {
                address: "postmaster".into()
            })
        );
        assert_eq!(
            classify("postmaster@TempAlias.test", &domains(), "+"),
            Ok(Recipient::Postmaster {
                address: "postmaster@tempalias.test".into()
            })
        );
        assert_eq!(
            classify("postmaster@example.org", &domains(), "+"),
            Err(NotOurs::Relay)
        );
    }

    #[test]
    fn alias_recipients_keep_their_tag() {
        let id = crate::alias::new_id();
        assert_eq!(
            classify(
                &format!("{}+Shop@tempalias.test", id.to_uppercase()),
                &domains(),
                "+"
            ),
            Ok(Recipient::Alias {
                id: id.clone(),
                tag: "+Shop".into(),
                domain: "tempalias.test".into()
            })
        );
        assert_eq!(classify("nobody", &domains(), "+"), Err(NotOurs::Syntax));
        assert_eq!(
            classify("x@other.test", &domains(), "+"),
            Err(NotOurs::Relay)
        );
        assert_eq!(
            classify("not-an-id@tempalias.test", &domains(), "+"),
            Err(NotOurs::NoSuchId)
        );
    }
}
