//! The tar stream the tarball's check keeps for the extraction: every byte its tar reader
//! reads, written as it goes, up to a bound.

use std::io::{BufWriter, Read, Write};

/// How much the check writes at once: a tarball of many small files is not a write a
/// header.
const WRITE_AT_ONCE: usize = 256 * 1024;

/// Where the check keeps the tar stream it reads, and how much it may write there: a
/// tarball that inflates past the room its copy has (a gzip bomb) fills no disk.
pub struct Kept<W: Write> {
    out: BufWriter<W>,
    written: u64,
    most: u64,
    /// The first write that failed: the tar reader meets it as a broken stream, and the
    /// check says it as what it is.
    failure: Option<std::io::Error>,
}

impl<W: Write> Kept<W> {
    pub fn new(out: W, most: u64) -> Kept<W> {
        Kept {
            out: BufWriter::with_capacity(WRITE_AT_ONCE, out),
            written: 0,
            most,
            failure: None,
        }
    }

    /// `inner`, with every byte read through it kept.
    pub fn tee<R: Read>(&mut self, inner: R) -> Tee<'_, R, W> {
        Tee { inner, kept: self }
    }

    /// Why keeping failed, if it did.
    pub fn failure(&mut self) -> Option<std::io::Error> {
        self.failure.take()
    }

    /// Writes out what is still buffered.
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn keep(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let after = self.written + bytes.len() as u64;
        if after > self.most {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "the tarball inflates past {} bytes, half the space that was free where the run keeps its work (TMPDIR, else /tmp)",
                    self.most
                ),
            ));
        }
        self.out.write_all(bytes)?;
        self.written = after;
        Ok(())
    }
}

/// A reader whose bytes are kept as they are read.
pub struct Tee<'k, R, W: Write> {
    inner: R,
    kept: &'k mut Kept<W>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.kept.failure.is_some() {
            return Err(std::io::Error::other("the tar stream could not be kept"));
        }
        let n = self.inner.read(buf)?;
        if let Err(e) = self.kept.keep(&buf[..n]) {
            let said = std::io::Error::new(e.kind(), e.to_string());
            self.kept.failure = Some(e);
            return Err(said);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_read_through_the_tee_is_kept_byte_for_byte() {
        let stream: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        let mut kept = Kept::new(&mut out, stream.len() as u64);
        let mut read = Vec::new();
        kept.tee(stream.as_slice()).read_to_end(&mut read).unwrap();
        kept.finish().unwrap();
        assert!(kept.failure().is_none());
        drop(kept);
        assert_eq!(read, stream);
        assert_eq!(out, stream, "kept as read, no more, no less");
    }

    #[test]
    fn a_stream_past_the_bound_stops_the_reading_and_is_said() {
        let stream = vec![0u8; 100_000];
        let mut out = Vec::new();
        let mut kept = Kept::new(&mut out, 40_000);
        let mut tee = kept.tee(stream.as_slice());
        let mut buf = [0u8; 16 * 1024];
        let mut read = 0;
        let error = loop {
            match tee.read(&mut buf) {
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert!(read <= 40_000, "read {read} past the bound");
        assert!(
            error.to_string().contains("inflates past 40000 bytes"),
            "{error}"
        );
        assert!(tee.read(&mut buf).is_err(), "and stays stopped");
        let failure = kept
            .failure()
            .expect("the failure is kept for the check to say");
        assert_eq!(failure.kind(), std::io::ErrorKind::StorageFull);
        kept.finish().unwrap();
        drop(kept);
        assert!(out.len() <= 40_000, "{} bytes written", out.len());
    }

    #[test]
    fn a_write_that_fails_is_the_failure_said() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let stream = vec![1u8; 2 * WRITE_AT_ONCE];
        let mut kept = Kept::new(Full, u64::MAX);
        let error = std::io::copy(&mut kept.tee(stream.as_slice()), &mut std::io::sink())
            .expect_err("no room");
        assert!(error.to_string().contains("os error 28"), "{error}");
        let failure = kept.failure().unwrap();
        assert_eq!(failure.raw_os_error(), Some(libc::ENOSPC));
    }
}
