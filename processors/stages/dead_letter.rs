//! Decoding a stage's input, and what happens when it cannot be decoded: a registry that is
//! away is waited for (by time), a poison record goes to the dead-letter topic with its reason.

use crate::clock::wall_clock_ms;
use crate::events::*;
use crate::kafka::{provenance_of, OutRecord, Outbox};
use crate::registry::{Codec, DecodeError};
use crate::telemetry::Metrics;
use anyhow::{bail, Result};
use rdkafka::message::{Message, OwnedMessage};
use std::time::Duration;

/// Decodes with retries for registry outages; poison is returned for the dead-letter topic.
pub(crate) fn decode_with_retry<T>(
    rt: &tokio::runtime::Handle,
    f: impl FnMut() -> Result<T, DecodeError>,
) -> Result<Result<T, String>> {
    decode_with_retry_for(rt, crate::registry::OUTAGE_BUDGET, f)
}

/// As `decode_with_retry`, waiting out an outage for at most `budget`: a registry refusing
/// connections fails each try at once, so a count of tries would give up within seconds.
pub(crate) fn decode_with_retry_for<T>(
    rt: &tokio::runtime::Handle,
    budget: Duration,
    mut f: impl FnMut() -> Result<T, DecodeError>,
) -> Result<Result<T, String>> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match f() {
            Ok(v) => return Ok(Ok(v)),
            Err(DecodeError::Poison(why)) => return Ok(Err(why)),
            Err(DecodeError::Retryable(why)) => {
                let waited = started.elapsed();
                if waited >= budget {
                    bail!(
                        "schema registry unavailable for {} s, stopping so the process is restarted: {why}",
                        waited.as_secs()
                    );
                }
                tracing::warn!(error = %why, "registry unavailable; retrying");
                let pause = delay.min(budget - waited);
                // The timer is made inside the runtime: this thread is not one of its workers.
                rt.block_on(async { tokio::time::sleep(pause).await });
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Decodes a record, retrying registry outages; poison goes to the dead-letter topic in the
/// current transaction and yields `None`.
pub(crate) fn decode_or_dead_letter<'a, T, F>(
    codec: &'a Codec,
    rt: &tokio::runtime::Handle,
    metrics: &Metrics,
    msg: &OwnedMessage,
    out: &mut Outbox,
    decode: impl Fn(&'a Codec) -> F,
) -> Result<Option<T>>
where
    F: std::future::Future<Output = Result<T, DecodeError>>,
{
    match decode_with_retry(rt, || rt.block_on(decode(codec)))? {
        Ok(v) => Ok(Some(v)),
        Err(why) => {
            out.records
                .push(dead_letter(codec, rt, msg, "decode", why, metrics)?);
            Ok(None)
        }
    }
}

pub(crate) fn dead_letter(
    codec: &Codec,
    rt: &tokio::runtime::Handle,
    msg: &OwnedMessage,
    stage: &str,
    error: String,
    metrics: &Metrics,
) -> Result<OutRecord> {
    let letter = DeadLetter {
        source_topic: msg.topic().to_string(),
        source_partition: msg.partition(),
        source_offset: msg.offset(),
        key: msg.key().map(|k| k.to_vec()),
        value: msg.payload().map(|v| v.to_vec()),
        stage: stage.to_string(),
        error,
        failed_at: wall_clock_ms(),
    };
    dead_letter_record(codec, rt, letter, metrics)
}

/// The dead-letter topic's record of a dead letter, on its source's partition and key, with the
/// provenance and the error as headers; logged and counted.
pub(crate) fn dead_letter_record(
    codec: &Codec,
    rt: &tokio::runtime::Handle,
    letter: DeadLetter,
    metrics: &Metrics,
) -> Result<OutRecord> {
    tracing::warn!(topic = %letter.source_topic, partition = letter.source_partition, offset = letter.source_offset, error = %letter.error, "record dead-lettered");
    metrics.dead_letter(&letter.stage, &letter.source_topic);
    let mut headers = provenance_of(
        &letter.source_topic,
        letter.source_partition,
        letter.source_offset,
    );
    headers.push(("herald.error", letter.error.clone().into_bytes()));
    Ok(OutRecord {
        topic: codec.topics().dlq().clone(),
        partition: letter.source_partition,
        key: letter.key.clone().unwrap_or_default(),
        value: rt.block_on(codec.encode_dead_letter(&letter))?,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_outage_is_retried_from_a_stage_thread_and_poison_is_not() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        // Stages decode on plain threads that hold only a handle to the runtime.
        std::thread::spawn(move || {
            let mut calls = 0;
            let decoded = decode_with_retry(&handle, || {
                calls += 1;
                if calls < 3 {
                    Err(DecodeError::Retryable("registry down".into()))
                } else {
                    Ok(calls)
                }
            })
            .unwrap();
            assert_eq!(decoded, Ok(3));
            let poison: Result<Result<u32, String>> =
                decode_with_retry(&handle, || Err(DecodeError::Poison("not avro".into())));
            assert_eq!(poison.unwrap(), Err("not avro".to_string()));
            // An outage longer than the budget stops the stage, saying why.
            let started = std::time::Instant::now();
            let gave_up: Result<Result<u32, String>> =
                decode_with_retry_for(&handle, Duration::from_millis(400), || {
                    Err(DecodeError::Retryable("connection refused".into()))
                });
            let why = gave_up.unwrap_err().to_string();
            assert!(why.contains("connection refused"), "{why}");
            assert!(started.elapsed() >= Duration::from_millis(400));
            assert!(started.elapsed() < Duration::from_secs(3));
        })
        .join()
        .unwrap();
    }
}
