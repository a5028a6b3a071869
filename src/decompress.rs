//! An event stream is never compressed: we ask upstreams for `identity`,
//! and an upstream that compresses anyway (`gzip`, `deflate`, `br`) is
//! decompressed here, chunk by chunk, before it is re-framed.

use std::io::Write;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;

use crate::upstream::UpstreamBody;

/// Compressed bytes fed to the decoder at a time; with gzip's ratio limit
/// this bounds the output of one step to about 1 MiB.
const STEP: usize = 1024;
/// Output gathered before a chunk is handed on.
const OUT_TARGET: usize = 64 * 1024;

/// Why the next chunk could not be had.
#[derive(Debug)]
pub enum ChunkError {
    Upstream(crate::body::BoxError),
    Decode(std::io::Error),
}

enum Codec {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
}

impl Codec {
    fn for_headers(headers: &HeaderMap) -> Option<Codec> {
        let enc = headers.get(http::header::CONTENT_ENCODING)?.to_str().ok()?.trim().to_ascii_lowercase();
        match enc.as_str() {
            "gzip" | "x-gzip" => Some(Codec::Gzip(flate2::write::GzDecoder::new(Vec::new()))),
            "deflate" => Some(Codec::Deflate(flate2::write::ZlibDecoder::new(Vec::new()))),
            "br" => Some(Codec::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(Vec::new(), 4096)))),
            _ => None,
        }
    }

    fn write(&mut self, input: &[u8]) -> std::io::Result<()> {
        match self {
            Codec::Gzip(d) => d.write_all(input).and_then(|_| d.flush()),
            Codec::Deflate(d) => d.write_all(input).and_then(|_| d.flush()),
            Codec::Brotli(d) => d.write_all(input).and_then(|_| d.flush()),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Codec::Gzip(d) => d.get_mut(),
            Codec::Deflate(d) => d.get_mut(),
            Codec::Brotli(d) => d.get_mut(),
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Codec::Gzip(d) => d.try_finish(),
            Codec::Deflate(d) => d.try_finish(),
            Codec::Brotli(d) => d.close(),
        }
    }
}

/// The upstream body as plain bytes.
pub struct Decoded {
    inner: UpstreamBody,
    /// Boxed: most streams are not compressed, and a decoder's state is
    /// large (it would sit in every stream's body).
    codec: Option<Box<Codec>>,
    /// Compressed bytes not yet fed to the codec.
    pending: Bytes,
    done: bool,
}

impl Decoded {
    /// Wraps an upstream body, decompressing per its `Content-Encoding`.
    pub fn new(inner: UpstreamBody, headers: &HeaderMap) -> Decoded {
        Decoded { inner, codec: Codec::for_headers(headers).map(Box::new), pending: Bytes::new(), done: false }
    }

    /// Lets go of the upstream body's empty read buffer (a quiet stream's).
    pub fn trim(&mut self) {
        self.inner.trim();
    }

    /// The next chunk of plain bytes; `None` at the end of the body.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ChunkError>>> {
        loop {
            if self.codec.is_some() && !self.pending.is_empty() {
                if let Some(out) = self.step().map_err(ChunkError::Decode)? {
                    return Poll::Ready(Some(Ok(out)));
                }
                continue;
            }
            if self.done {
                return Poll::Ready(None);
            }
            let data = match self.inner.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(ChunkError::Upstream(e)))),
                Poll::Ready(Some(Ok(data))) => data,
                Poll::Ready(None) => {
                    self.done = true;
                    let Some(codec) = &mut self.codec else { return Poll::Ready(None) };
                    codec.finish().map_err(ChunkError::Decode)?;
                    let out = std::mem::take(codec.output());
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Bytes::from(out))));
                }
            };
            if self.codec.is_none() {
                return Poll::Ready(Some(Ok(data)));
            }
            self.pending = data;
        }
    }

    /// Feeds compressed input in small steps until enough output is ready.
    fn step(&mut self) -> std::io::Result<Option<Bytes>> {
        let Some(codec) = &mut self.codec else { return Ok(None) };
        while !self.pending.is_empty() && codec.output().len() < OUT_TARGET {
            let piece = self.pending.split_to(self.pending.len().min(STEP));
            codec.write(&piece)?;
        }
        let out = std::mem::take(codec.output());
        Ok((!out.is_empty()).then(|| Bytes::from(out)))
    }
}
