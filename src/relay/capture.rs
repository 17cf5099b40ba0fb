//! The capture sink: forwarded mail written to a directory instead of sent.
//!
//! Each message becomes `<name>.eml` (the bytes exactly as they would have gone
//! upstream) beside `<name>.json` (the envelope). Files are written under a
//! temporary name, fsynced and renamed, `.json` first, so a reader that sees an
//! `.eml` file sees a complete message with its envelope.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Delivery, Envelope, RelayError};

/// Writes each forwarded message into a directory.
pub struct CaptureRelay {
    dir: PathBuf,
    seq: AtomicU64,
}

impl CaptureRelay {
    /// Creates the directory if needed.
    ///
    /// # Errors
    /// [`RelayError::CaptureDir`] when it cannot be created.
    pub fn new(dir: &Path) -> Result<Self, RelayError> {
        std::fs::create_dir_all(dir).map_err(|error| RelayError::CaptureDir {
            path: dir.display().to_string(),
            error,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            seq: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub async fn deliver(&self, envelope: &Envelope, message: std::sync::Arc<Vec<u8>>) -> Delivery {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let name = format!(
            "{now}-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.dir.clone();
        let meta = serde_json::json!({
            "mail_from": envelope.mail_from,
            "rcpt_to": envelope.rcpt_to,
            "size": message.len(),
        });
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // A text file ends with a newline (`cat` leaves the prompt alone).
            let meta = format!("{meta}\n");
            write_atomically(&dir, &format!("{name}.json"), meta.as_bytes())?;
            write_atomically(&dir, &format!("{name}.eml"), &message)?;
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => Delivery::Accepted,
            Ok(Err(e)) => Delivery::TempFail(format!("capture directory: {e}")),
            Err(e) => Delivery::TempFail(format!("capture task: {e}")),
        }
    }
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_message_and_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let relay = CaptureRelay::new(&dir.path().join("out")).unwrap();
        let env = Envelope {
            mail_from: "a@b.example".into(),
            rcpt_to: vec!["c@d.example".into()],
        };
        assert_eq!(
            relay
                .deliver(
                    &env,
                    std::sync::Arc::new(b"Subject: x\r\n\r\nhi\r\n".to_vec())
                )
                .await,
            Delivery::Accepted
        );
        let mut names: Vec<String> = std::fs::read_dir(relay.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        let eml = names.iter().find(|n| n.ends_with(".eml")).unwrap();
        let json = names.iter().find(|n| n.ends_with(".json")).unwrap();
        assert_eq!(
            std::fs::read(relay.dir().join(eml)).unwrap(),
            b"Subject: x\r\n\r\nhi\r\n"
        );
        let json = std::fs::read(relay.dir().join(json)).unwrap();
        assert!(json.ends_with(b"}\n"), "{}", String::from_utf8_lossy(&json));
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["rcpt_to"][0], "c@d.example");
        assert_eq!(v["mail_from"], "a@b.example");
    }
}
