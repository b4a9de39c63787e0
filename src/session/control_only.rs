//! The client socket's read side, checked frame by frame before
//! tungstenite sees it. Clients may only send control frames (DESIGN §2),
//! but tungstenite assembles a fragmented message before returning it, so
//! a first fragment (FIN=0 text or binary) or a stream of empty
//! continuation frames would never surface. This follows the frame headers
//! as the bytes go by and fails the read at the first data frame's header,
//! handing tungstenite none of that read; the session then closes with
//! 4003.

use crate::listen::ReadCheck;

/// The read error a data frame from the client turns into.
#[derive(Debug, thiserror::Error)]
#[error("the client sent a data frame")]
pub(super) struct DataFrame;

/// Whether a read error is [`DataFrame`].
pub(super) fn is_data_frame(err: &std::io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<DataFrame>())
}

/// Where the byte stream is.
#[derive(Debug, Clone, Copy)]
enum At {
    /// In the HTTP request head: `matched` bytes of `\r\n\r\n` seen.
    Head { matched: usize },
    /// In a frame header: its first `have` bytes are in `header`.
    Header { header: [u8; 14], have: usize },
    /// In a frame's payload, `left` bytes to go.
    Payload { left: u64 },
}

/// The check that refuses data frames, for [`crate::listen::Prefixed`]
/// on the client socket.
pub(crate) struct ControlOnly {
    at: At,
}

impl ControlOnly {
    /// The stream starts with the client's HTTP request head.
    pub(crate) fn new() -> ControlOnly {
        ControlOnly {
            at: At::Head { matched: 0 },
        }
    }

    /// Follows `bytes`; `Err` at the header of a data frame.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), DataFrame> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match &mut self.at {
                At::Head { matched } => {
                    let want = b"\r\n\r\n"[*matched];
                    *matched = match byte {
                        b if b == want => *matched + 1,
                        b'\r' => 1,
                        _ => 0,
                    };
                    if *matched == 4 {
                        self.at = At::Header {
                            header: [0; 14],
                            have: 0,
                        };
                    }
                    bytes = rest;
                }
                At::Header { header, have } => {
                    header[*have] = byte;
                    *have += 1;
                    bytes = rest;
                    if let Some(left) = payload_len(&header[..*have])? {
                        self.at = if left == 0 {
                            At::Header {
                                header: [0; 14],
                                have: 0,
                            }
                        } else {
                            At::Payload { left }
                        };
                    }
                }
                At::Payload { left } => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.at = At::Header {
                            header: [0; 14],
                            have: 0,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// A frame header so far: `Err` once its opcode says data (continuation,
/// text, binary or a reserved data opcode), the payload length once the
/// header is complete, `None` while it isn't.
fn payload_len(header: &[u8]) -> Result<Option<u64>, DataFrame> {
    let [first, second, ext @ ..] = header else {
        return Ok(None);
    };
    if first & 0x08 == 0 {
        // Opcodes 0x0-0x7: data frames.
        return Err(DataFrame);
    }
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (len_bytes, short) = match second & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    if ext.len() < len_bytes + mask {
        return Ok(None);
    }
    Ok(Some(short.unwrap_or_else(|| {
        ext[..len_bytes]
            .iter()
            .fold(0u64, |n, &b| (n << 8) | u64::from(b))
    })))
}

impl ReadCheck for ControlOnly {
    fn check(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.follow(bytes)
            .map_err(|refused| std::io::Error::new(std::io::ErrorKind::InvalidData, refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(chunks: &[&[u8]]) -> Result<(), DataFrame> {
        let mut check = ControlOnly::new();
        chunks.iter().try_for_each(|c| check.follow(c))
    }

    const HEAD: &[u8] = b"GET /gateway HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn control_frames_pass_and_data_frames_fail_at_their_header() {
        // A masked pong with 2 bytes, a ping with none, a close with a code.
        let pong: &[u8] = &[0x8a, 0x82, 1, 2, 3, 4, 9, 9];
        let ping: &[u8] = &[0x89, 0x80, 1, 2, 3, 4];
        let close: &[u8] = &[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];
        assert!(fed(&[HEAD, pong, ping, close]).is_ok());
        // Split anywhere, even inside the head's terminator and a header.
        let all = [HEAD, pong, ping, close].concat();
        for cut in 0..all.len() {
            assert!(fed(&[&all[..cut], &all[cut..]]).is_ok(), "cut at {cut}");
        }
        // A first fragment of text fails at its second header byte, before
        // any payload; so does an empty continuation frame.
        assert!(fed(&[HEAD, pong, &[0x01]]).is_ok());
        assert!(fed(&[HEAD, pong, &[0x01, 0x85]]).is_err());
        assert!(fed(&[HEAD, &[0x00, 0x80]]).is_err());
        assert!(fed(&[HEAD, &[0x82, 0x80]]).is_err());
        // A payload byte that looks like a data header is payload.
        assert!(fed(&[HEAD, &[0x8a, 0x81, 0, 0, 0, 0, 0x01], ping]).is_ok());
    }
}
