//! A register bank for the benchmarks: an in-process Modbus TCP server (tokio-modbus) that answers
//! every holding and input register and every coil and discrete input of the whole address space
//! with values that move over time, and counts the requests it answered. Started with a request
//! limit, it refuses longer register reads with exception 3 (illegal data value), as many real
//! devices do below the protocol's 125 registers.

use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

/// The running bank: its address and its request counter.
pub(crate) struct Bank {
    pub(crate) addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl Bank {
    /// Binds 127.0.0.1 on a free port and serves on the current tokio runtime.
    pub(crate) async fn start() -> Self {
        Self::start_with_limit(None).await
    }

    /// Like [`Bank::start`]; with `Some(limit)`, a read of more than `limit` registers is
    /// refused with exception 3.
    pub(crate) async fn start_with_limit(register_limit: Option<u16>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let requests = Arc::new(AtomicU64::new(0));
        let service = Arc::new(BankService {
            requests: Arc::clone(&requests),
            started: Instant::now(),
            register_limit,
        });
        tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream, peer| {
                let service = Arc::clone(&service);
                async move { accept_tcp_connection(stream, peer, |_| Ok(Some(Arc::clone(&service)))) }
            };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
        Self { addr, requests }
    }

    /// Requests answered so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

struct BankService {
    requests: Arc<AtomicU64>,
    started: Instant,
    register_limit: Option<u16>,
}

impl BankService {
    /// Register `address` at this moment: its address plus the seconds since the start, so every
    /// poll sees changing values (a deadband-free agent sends them all anyway).
    fn word(&self, address: u16) -> u16 {
        let tick = u16::try_from(self.started.elapsed().as_secs() % 1000).unwrap_or(0);
        address.wrapping_add(tick)
    }
}

impl tokio_modbus::server::Service for BankService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, request: Request<'static>) -> Self::Future {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let words = |start: u16, count: u16| -> Vec<u16> {
            (0..count)
                .map(|i| self.word(start.wrapping_add(i)))
                .collect()
        };
        let bits = |start: u16, count: u16| -> Vec<bool> {
            (0..count)
                .map(|i| self.word(start.wrapping_add(i)) % 2 == 1)
                .collect()
        };
        let too_long = |count: u16| self.register_limit.is_some_and(|limit| count > limit);
        ready(match request {
            Request::ReadHoldingRegisters(_, count) | Request::ReadInputRegisters(_, count)
                if too_long(count) =>
            {
                Err(ExceptionCode::IllegalDataValue)
            }
            Request::ReadHoldingRegisters(start, count) => {
                Ok(Response::ReadHoldingRegisters(words(start, count)))
            }
            Request::ReadInputRegisters(start, count) => {
                Ok(Response::ReadInputRegisters(words(start, count)))
            }
            Request::ReadCoils(start, count) => Ok(Response::ReadCoils(bits(start, count))),
            Request::ReadDiscreteInputs(start, count) => {
                Ok(Response::ReadDiscreteInputs(bits(start, count)))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}
