//! WASI for synchronous calls: the few WASI functions that may wait are answered at once,
//! or trap.
//!
//! Placement calls are synchronous wasmtime calls made on a proxy thread, inside its tokio
//! runtime. wasmtime-wasi's synchronous WASI runs each function that may wait (a
//! `blocking-*` stream method, `poll`, a stream's drop, opening a UDP socket) by blocking
//! on the current tokio runtime, which panics inside one. These replacements run the same
//! functions, poll them once, and take the answer if it is there. If it is not, the call
//! traps, naming the function: a placement plugin has a deadline of milliseconds and may
//! not wait (a `sleep`, a `poll` on a clock). What a well-behaved plugin touches, writing a
//! panic message to stderr, never waits: the store's stdout and stderr are sinks. The
//! calls run inside the caller's tokio runtime (every `Plugin` method is `async`), which
//! a clock's pollable needs in order to be polled at all.
//!
//! Everything else a plugin can reach is wasmtime-wasi's non-blocking code, linked first;
//! the filesystem and TCP functions that would wait need a descriptor or a socket that a
//! store granting nothing never hands out.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::io::streams::{
    HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi::p2::bindings::sockets::network::{self, ErrorCode};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::bindings::sync::sockets::udp::IpAddressFamily;
use wasmtime_wasi::p2::bindings::sync::sockets::udp_create_socket;
use wasmtime_wasi::p2::{
    DynPollable, SocketError, SocketResult, StreamError, StreamResult, UdpSocket,
};

/// The answer of `f` if it has one now; else `Err` naming `what`.
fn now<F: Future>(what: &str, f: F) -> Result<F::Output, wasmtime::Error> {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(answer) => Ok(answer),
        Poll::Pending => Err(wasmtime::format_err!(
            "a placement plugin may not wait: {what} would block"
        )),
    }
}

/// `now` for functions that answer a `StreamResult`.
fn now_stream<T, F: Future<Output = StreamResult<T>>>(what: &str, f: F) -> StreamResult<T> {
    now(what, f).map_err(StreamError::Trap)?
}

/// The resource table, seen through the non-blocking functions.
pub struct NonBlocking<'a>(&'a mut ResourceTable);

struct NonBlockingIo;

impl HasData for NonBlockingIo {
    type Data<'a> = NonBlocking<'a>;
}

/// Links wasmtime-wasi's synchronous WASI, with the functions that may wait replaced.
pub fn add_to_linker<T: wasmtime_wasi::WasiView>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    poll::add_to_linker::<T, NonBlockingIo>(linker, |t| NonBlocking(t.ctx().table))?;
    streams::add_to_linker::<T, NonBlockingIo>(linker, |t| NonBlocking(t.ctx().table))?;
    udp_create_socket::add_to_linker::<T, NonBlockingIo>(linker, |t| NonBlocking(t.ctx().table))?;
    linker.allow_shadowing(false);
    Ok(())
}

impl poll::Host for NonBlocking<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        now(
            "wasi:io/poll.poll",
            async_poll::Host::poll(self.0, pollables),
        )?
    }
}

impl poll::HostPollable for NonBlocking<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        now(
            "wasi:io/poll.pollable.ready",
            async_poll::HostPollable::ready(self.0, pollable),
        )?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        now(
            "wasi:io/poll.pollable.block",
            async_poll::HostPollable::block(self.0, pollable),
        )?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl streams::Host for NonBlocking<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostOutputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<streams::OutputStream>) -> wasmtime::Result<()> {
        now(
            "wasi:io/streams.output-stream.drop",
            AsyncOutput::drop(self.0, stream),
        )?
    }

    fn check_write(&mut self, stream: Resource<streams::OutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(
        &mut self,
        stream: Resource<streams::OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<streams::OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        now_stream(
            "wasi:io/streams.output-stream.blocking-write-and-flush",
            AsyncOutput::blocking_write_and_flush(self.0, stream, bytes),
        )
    }

    fn write_zeroes(
        &mut self,
        stream: Resource<streams::OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<streams::OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        now_stream(
            "wasi:io/streams.output-stream.blocking-write-zeroes-and-flush",
            AsyncOutput::blocking_write_zeroes_and_flush(self.0, stream, len),
        )
    }

    fn flush(&mut self, stream: Resource<streams::OutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<streams::OutputStream>) -> StreamResult<()> {
        now_stream(
            "wasi:io/streams.output-stream.blocking-flush",
            AsyncOutput::blocking_flush(self.0, stream),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<streams::OutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn splice(
        &mut self,
        dst: Resource<streams::OutputStream>,
        src: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<streams::OutputStream>,
        src: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        now_stream(
            "wasi:io/streams.output-stream.blocking-splice",
            AsyncOutput::blocking_splice(self.0, dst, src, len),
        )
    }
}

impl streams::HostInputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<streams::InputStream>) -> wasmtime::Result<()> {
        now(
            "wasi:io/streams.input-stream.drop",
            AsyncInput::drop(self.0, stream),
        )?
    }

    fn read(&mut self, stream: Resource<streams::InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        now_stream(
            "wasi:io/streams.input-stream.blocking-read",
            AsyncInput::blocking_read(self.0, stream, len),
        )
    }

    fn skip(&mut self, stream: Resource<streams::InputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(
        &mut self,
        stream: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        now_stream(
            "wasi:io/streams.input-stream.blocking-skip",
            AsyncInput::blocking_skip(self.0, stream, len),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<streams::InputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.0, stream)
    }
}

/// UDP is never granted: opening a socket is refused before anything could wait.
impl udp_create_socket::Host for NonBlocking<'_> {
    fn create_udp_socket(&mut self, _family: IpAddressFamily) -> SocketResult<Resource<UdpSocket>> {
        Err(ErrorCode::AccessDenied.into())
    }
}

impl network::Host for NonBlocking<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        error.downcast()
    }

    fn network_error_code(
        &mut self,
        _err: Resource<wasmtime_wasi::p2::bindings::io::error::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        Ok(None)
    }
}

impl network::HostNetwork for NonBlocking<'_> {
    fn drop(&mut self, network: Resource<network::Network>) -> wasmtime::Result<()> {
        self.0.delete(network)?;
        Ok(())
    }
}
