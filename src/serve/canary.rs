//! The serving layer's part in the canary judgement (see
//! [`canary`](crate::canary)): every response and failure of the
//! generation's connections is counted in its [`Recorder`], and a canary
//! with a share of the traffic paces its accepts.
//!
//! Outside a probation window this costs one relaxed atomic load per
//! request and one per accept.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};

use crate::canary::Recorder;

/// A service whose responses (status, latency to the response head) and
/// failures are counted in a [`Recorder`] during a probation window.
#[derive(Debug, Clone)]
pub(crate) struct Counted<S> {
    inner: S,
    recorder: Option<Recorder>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, recorder: Option<Recorder>) -> Self {
        Counted { inner, recorder }
    }
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let started = match &self.recorder {
            Some(r) if r.is_active() => Some((Instant::now(), r.clone())),
            _ => None,
        };
        CountedFuture {
            inner: self.inner.call(req),
            started,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a [`Counted`] service, counted when it is made.
    pub(crate) struct CountedFuture<F> {
        #[pin]
        inner: F,
        started: Option<(Instant, Recorder)>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some((at, recorder)) = this.started.take() {
            match &result {
                Ok(response) => recorder.response(response.status().as_u16(), at.elapsed()),
                Err(_) => recorder.failure(),
            }
        }
        Poll::Ready(result)
    }
}

/// A connection failed in the serving layer: counted as a failed request,
/// unless the service caused it (its error was counted with its call).
pub(crate) fn connection_failed(recorder: Option<&Recorder>, e: &hyper::Error) {
    if let (Some(r), false) = (recorder, e.is_user()) {
        r.failure();
    }
}

/// `accept`, once this generation may take a connection (a canary with a
/// share paces its accepts), counting the connection it accepted.
pub(crate) async fn paced<T>(
    recorder: Option<&Recorder>,
    accept: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let Some(r) = recorder else {
        return accept.await;
    };
    r.admit().await;
    let accepted = accept.await;
    if accepted.is_ok() {
        r.connection();
    }
    accepted
}
