//! Outbound delivery: where a forwarded message goes after DATA.
//!
//! The SMTP session answers its client from a [`Delivery`]: `250` only for
//! [`Delivery::Accepted`] (the upstream has taken responsibility, or the capture
//! file is on disk), `4xx` for anything that may clear, and the upstream's own
//! `5xx` for a permanent refusal.

mod capture;
mod smarthost;

pub use capture::CaptureRelay;
pub use smarthost::{SmarthostRelay, SmarthostUrl};

use crate::config::{RelayConfig, RelayMode};

/// The envelope of one outbound transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Envelope sender; empty for the null sender `<>` (bounces).
    pub mail_from: String,
    /// Envelope recipients (the aliases' targets), without duplicates.
    pub rcpt_to: Vec<String>,
}

/// What the upstream did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Accepted: the message is safe upstream.
    Accepted,
    /// Not delivered, and it may work later (unreachable, timeout, 4xx).
    TempFail(String),
    /// Refused for good by the upstream: its reply is passed on.
    PermFail {
        code: u16,
        enhanced: String,
        text: String,
    },
}

/// Why a relay could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay.capture_dir {path}: {error}")]
    CaptureDir { path: String, error: std::io::Error },
    #[error("relay.smarthosts: {0}")]
    Smarthost(String),
}

/// The configured outbound path.
pub enum Relay {
    Capture(CaptureRelay),
    Smarthost(SmarthostRelay),
}

impl Relay {
    /// Builds the relay chosen by `relay.mode`.
    ///
    /// # Errors
    /// [`RelayError`] when the capture directory cannot be created or a
    /// smarthost URL cannot be used.
    pub fn from_config(config: &RelayConfig, helo_name: &str) -> Result<Self, RelayError> {
        match config.mode {
            RelayMode::Capture => Ok(Relay::Capture(CaptureRelay::new(&config.capture_dir)?)),
            RelayMode::Smarthost => Ok(Relay::Smarthost(SmarthostRelay::new(config, helo_name)?)),
        }
    }

    /// Delivers one message. Never panics and never returns an error: every
    /// failure is classified into a [`Delivery`].
    /// The message is shared, not copied: it can be tens of megabytes.
    pub async fn deliver(&self, envelope: &Envelope, message: std::sync::Arc<Vec<u8>>) -> Delivery {
        match self {
            Relay::Capture(c) => c.deliver(envelope, message).await,
            Relay::Smarthost(s) => s.deliver(envelope, &message).await,
        }
    }

    /// Human description for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Relay::Capture(c) => format!("capture to {}", c.dir().display()),
            Relay::Smarthost(s) => format!("smarthosts {}", s.describe()),
        }
    }
}
