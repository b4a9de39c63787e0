//! Client tokens in the seed's format (DESIGN §2):
//! `base64url(user_id) "." base64url(issued_at, big-endian seconds) "."
//! base64url(HMAC-SHA256(secret, first two parts))`, unpadded.
//!
//! The issued-at field holds the seconds with leading zero bytes dropped, as
//! the seed's example (`DIIv8w` = 4 bytes) does.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::UserId;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. Deliberately coarse: clients get a 401 either
/// way, and the reason only goes to debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not three base64url parts")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token was issued in the future")]
    FromFuture,
}

/// How far in the future a token's issued-at may lie (clock skew between
/// the minting backend and this node) before an expiring token is refused.
pub const MAX_CLOCK_SKEW_S: u64 = 60;

/// What a valid token says: whose it is and when it was minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub user: UserId,
    /// Unix seconds.
    pub issued_at: u64,
}

/// Mints and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenKey {
    mac: HmacSha256,
    ttl_s: Option<u64>,
}

impl TokenKey {
    /// `ttl_s = None` makes tokens valid forever (the seed's behaviour).
    pub fn new(secret: &[u8], ttl_s: Option<u64>) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = match HmacSha256::new_from_slice(secret) {
            Ok(mac) => mac,
            Err(_) => unreachable_hmac(),
        };
        TokenKey { mac, ttl_s }
    }

    /// A token for `user` issued at `issued_at` (unix seconds).
    pub fn issue(&self, user: UserId, issued_at: u64) -> String {
        let user_part = B64.encode(user.to_string());
        let bytes = issued_at.to_be_bytes();
        let first = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        let time_part = B64.encode(&bytes[first..]);
        let signed = format!("{user_part}.{time_part}");
        let sig = B64.encode(self.sign(signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    /// The user a token names, if its signature holds and it hasn't expired
    /// at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<UserId, TokenError> {
        self.verify_claims(token, now).map(|claims| claims.user)
    }

    /// The first second (unix) at which a token issued at `issued_at` is
    /// refused as expired; `None` without a TTL.
    pub fn expires_at(&self, issued_at: u64) -> Option<u64> {
        self.ttl_s
            .map(|ttl| issued_at.saturating_add(ttl).saturating_add(1))
    }

    /// [`verify`](Self::verify), keeping the issued-at (revocation and
    /// expiry compare against it). With a TTL, a token minted more than
    /// [`MAX_CLOCK_SKEW_S`] ahead of `now` is refused: it would otherwise
    /// outlive its TTL.
    pub fn verify_claims(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(user_part), Some(time_part), Some(sig_part), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let sig = B64.decode(sig_part).map_err(|_| TokenError::Malformed)?;
        let signed_len = user_part.len() + 1 + time_part.len();
        let mut mac = self.mac.clone();
        mac.update(&token.as_bytes()[..signed_len]);
        // `verify_slice` compares in constant time.
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;

        let user = B64.decode(user_part).map_err(|_| TokenError::Malformed)?;
        let user = std::str::from_utf8(&user)
            .ok()
            .and_then(|s| s.parse::<UserId>().ok())
            .ok_or(TokenError::Malformed)?;
        let time = B64.decode(time_part).map_err(|_| TokenError::Malformed)?;
        if time.is_empty() || time.len() > 8 {
            return Err(TokenError::Malformed);
        }
        let issued_at = time.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        if let Some(ttl) = self.ttl_s {
            if issued_at > now.saturating_add(MAX_CLOCK_SKEW_S) {
                return Err(TokenError::FromFuture);
            }
            if now.saturating_sub(issued_at) > ttl {
                return Err(TokenError::Expired);
            }
        }
        Ok(Claims { user, issued_at })
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }
}

#[cold]
fn unreachable_hmac() -> ! {
    unreachable!("HMAC-SHA256 accepts keys of any length")
}

/// Seconds since the unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"change-me", None)
    }

    #[test]
    fn fixed_vector() {
        // The seed's example header decodes to user 318109820710420480
        // issued at 0x0C822FF3; the signature was computed independently with
        // Python's hmac module for secret "change-me".
        let token = key().issue(UserId::new(318109820710420480).unwrap(), 0x0C82_2FF3);
        let (user, rest) = token.split_once('.').unwrap();
        assert_eq!(user, "MzE4MTA5ODIwNzEwNDIwNDgw");
        assert_eq!(rest.split('.').next(), Some("DIIv8w"));
        assert_eq!(
            token,
            "MzE4MTA5ODIwNzEwNDIwNDgw.DIIv8w.GiNdlaS0EBqlLNy9folmbMne6IanRJZW2VwD6kbenBE"
        );
        assert_eq!(key().verify(&token, 0).unwrap().get(), 318109820710420480);
    }

    #[test]
    fn tampering_is_refused() {
        let token = key().issue(UserId::new(42).unwrap(), 1_700_000_000);
        let other = key().issue(UserId::new(43).unwrap(), 1_700_000_000);
        let forged = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            token.rsplit_once('.').unwrap().1
        );
        assert_eq!(key().verify(&forged, 0), Err(TokenError::BadSignature));
        let wrong_key = TokenKey::new(b"other", None);
        assert_eq!(wrong_key.verify(&token, 0), Err(TokenError::BadSignature));
        assert_eq!(key().verify("garbage", 0), Err(TokenError::Malformed));
        assert_eq!(key().verify("a.b.c.d", 0), Err(TokenError::Malformed));
        assert_eq!(key().verify("", 0), Err(TokenError::Malformed));
    }

    #[test]
    fn expiry_is_optional() {
        let key = TokenKey::new(b"s", Some(60));
        let token = key.issue(UserId::new(7).unwrap(), 1000);
        assert_eq!(key.verify(&token, 1060).unwrap().get(), 7);
        assert_eq!(key.verify(&token, 1061), Err(TokenError::Expired));
        assert_eq!(key.expires_at(1000), Some(1061));
        assert_eq!(self::key().expires_at(1000), None);
        // Without a TTL the issued-at is not judged at all.
        assert_eq!(self::key().verify(&token, 0), Err(TokenError::BadSignature));
        let forever = self::key().issue(UserId::new(7).unwrap(), u64::MAX);
        assert_eq!(self::key().verify(&forever, 0).unwrap().get(), 7);
    }

    #[test]
    fn future_issued_at_beyond_the_skew_is_refused_with_a_ttl() {
        let key = TokenKey::new(b"s", Some(60));
        let at = key.issue(UserId::new(7).unwrap(), 1000 + MAX_CLOCK_SKEW_S);
        let claims = key.verify_claims(&at, 1000).unwrap();
        assert_eq!(claims.issued_at, 1000 + MAX_CLOCK_SKEW_S);
        let beyond = key.issue(UserId::new(7).unwrap(), 1001 + MAX_CLOCK_SKEW_S);
        assert_eq!(key.verify(&beyond, 1000), Err(TokenError::FromFuture));
    }
}
