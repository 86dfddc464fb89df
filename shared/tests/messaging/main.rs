//! Messaging and storage against the real RabbitMQ (`AMQP_URL`, default the local broker); each
//! test works in its own namespace and deletes its exchanges and queues at the end.

mod batches;
mod dedup;
mod dlq;
mod helpers;
mod outbox;
mod publish;
mod reconnect;
mod retries;
mod traces;
