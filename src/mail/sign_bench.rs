//! What one DKIM signature costs, and the two crypto libraries behind it:
//!
//! cargo test --release --lib sign_bench -- --ignored --nocapture
//!
//! Signs the same header block with an RSA-2048 key (`dkim keygen`'s
//! default) through rustls' ring and aws-lc-rs providers (the raw
//! RSASSA-PKCS1-v1_5 SHA-256 signature, what DKIM's `rsa-sha256` is), and a
//! whole message through [`DomainSigner`] (mail-auth on aws-lc-rs: body
//! hash, header canonicalisation, signature, the field written out) with
//! the RSA key and with an Ed25519 key. Rounds alternate between the
//! candidates; the medians over the rounds are printed with the ratio of
//! aws-lc-rs to ring from the same rounds. Not part of the test run: a
//! figure, not a check (docs/benchmarks.md, "DKIM and TLS on aws-lc-rs").

use std::time::Instant;

use rustls::pki_types::PrivateKeyDer;
use rustls::SignatureScheme;

use super::dkim::{generate, write_key_file, Algorithm, DomainSigner, KeyMaterial};

const ROUNDS: usize = 7;
const PER_ROUND: usize = 500;

/// A forwarded message's header block, about what a signer hashes.
const HEADERS: &[u8] = b"from:Alice <alice@sender.example>\r\nto:k7q2mz9xwd@tempalias.test\r\n\
    subject:hi\r\ndate:Sun, 29 Nov 2026 12:00:00 +0000\r\nmessage-id:<1@sender.example>\r\n\
    dkim-signature:v=1; a=rsa-sha256; d=tempalias.test; s=s1; c=relaxed/relaxed; h=from:to; b=";

/// Microseconds per call of `f`, over [`PER_ROUND`] calls.
fn per_call(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..PER_ROUND {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / PER_ROUND as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A key of `dkim keygen`, loaded as the node loads it.
fn key(alg: Algorithm, dir: &std::path::Path) -> (KeyMaterial, String) {
    let generated = generate(alg).unwrap();
    let path = dir.join(format!("{alg:?}.pem"));
    write_key_file(&path, &generated.private_pem).unwrap();
    (
        KeyMaterial::load(&path, Some(alg)).unwrap(),
        generated.private_pem,
    )
}

#[test]
#[ignore = "benchmark: cargo test --release --lib sign_bench -- --ignored --nocapture"]
fn sign_bench() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, rsa_pem) = key(Algorithm::Rsa, dir.path());
    let (ed, _) = key(Algorithm::Ed25519, dir.path());
    let der = || {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(rsa_pem.as_bytes()).unwrap()
    };
    let signer = |key: std::sync::Arc<dyn rustls::sign::SigningKey>| {
        key.choose_scheme(&[SignatureScheme::RSA_PKCS1_SHA256])
            .unwrap()
    };
    let ring = signer(rustls::crypto::ring::sign::any_supported_type(&der()).unwrap());
    let aws = signer(rustls::crypto::aws_lc_rs::sign::any_supported_type(&der()).unwrap());
    assert_eq!(
        ring.sign(HEADERS).unwrap(),
        aws.sign(HEADERS).unwrap(),
        "PKCS#1 v1.5 signatures are deterministic: both libraries must agree"
    );
    let dkim_rsa = DomainSigner::new("tempalias.test", &[("r1", &rsa)]).unwrap();
    let dkim_ed = DomainSigner::new("tempalias.test", &[("e1", &ed)]).unwrap();
    let message = format!(
        "From: Alice <alice@sender.example>\r\nTo: k7q2mz9xwd@tempalias.test\r\nSubject: hi\r\n\
         Date: Sun, 29 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\n{}",
        "A line of a body of about five kilobytes, as the forwarding benchmarks send.\r\n"
            .repeat(64)
    );
    let (mut r, mut a, mut ratio, mut m_rsa, mut m_ed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always meets a warm cache.
        let (x, y) = if round % 2 == 0 {
            let x = per_call(|| drop(ring.sign(HEADERS).unwrap()));
            (x, per_call(|| drop(aws.sign(HEADERS).unwrap())))
        } else {
            let y = per_call(|| drop(aws.sign(HEADERS).unwrap()));
            (per_call(|| drop(ring.sign(HEADERS).unwrap())), y)
        };
        r.push(x);
        a.push(y);
        ratio.push(y / x);
        m_rsa.push(per_call(|| {
            drop(dkim_rsa.sign(message.as_bytes()).unwrap())
        }));
        m_ed.push(per_call(|| drop(dkim_ed.sign(message.as_bytes()).unwrap())));
    }
    println!(
        "RSA-2048 signature (RSASSA-PKCS1-v1_5 SHA-256), {ROUNDS} rounds of {PER_ROUND}, medians:"
    );
    println!("  ring       {:8.1} us", median(r));
    println!(
        "  aws-lc-rs  {:8.1} us  (x{:.2} of ring, median of the per-round ratios)",
        median(a),
        median(ratio)
    );
    println!(
        "DKIM-Signature for a {}-byte message through DomainSigner (mail-auth on aws-lc-rs):",
        message.len()
    );
    println!("  RSA-2048   {:8.1} us", median(m_rsa));
    println!("  Ed25519    {:8.1} us", median(m_ed));
}
