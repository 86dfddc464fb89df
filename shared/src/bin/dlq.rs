//! `dlq`: list or redrive a consumer's dead-letter queue.
//!
//! ```text
//! cargo run -p shared --bin dlq -- list inventory.order-events [--limit 20]
//! cargo run -p shared --bin dlq -- redrive inventory.order-events [--limit 10]
//! ```
//!
//! Reads `AMQP_URL` and `EVENTS_NAMESPACE` like the services. `list` prints one JSON object per
//! dead letter; `redrive` moves messages back to the consumer's queue and prints how many.

use std::process::ExitCode;

use shared::config::Env;
use shared::messaging::{MessagingSettings, dlq};

/// Dead letters shown by `list` when no `--limit` is given: a screenful.
const DEFAULT_LIST_LIMIT: usize = 20;

const USAGE: &str = "usage: dlq list <queue> [--limit N] | dlq redrive <queue> [--limit N]";

enum Command {
    List { queue: String, limit: usize },
    Redrive { queue: String, limit: Option<usize> },
}

fn parse(args: &[String]) -> Result<Command, String> {
    let (command, queue, rest) = match args {
        [command, queue, rest @ ..] => (command.as_str(), queue.clone(), rest),
        _ => return Err(USAGE.to_owned()),
    };
    let limit = match rest {
        [] => None,
        [flag, n] if flag == "--limit" => Some(
            n.parse::<usize>()
                .map_err(|e| format!("--limit {n}: {e}"))?,
        ),
        _ => return Err(USAGE.to_owned()),
    };
    match command {
        "list" => Ok(Command::List {
            queue,
            limit: limit.unwrap_or(DEFAULT_LIST_LIMIT),
        }),
        "redrive" => Ok(Command::Redrive { queue, limit }),
        _ => Err(USAGE.to_owned()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse(&args) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let settings = match MessagingSettings::from_env(&Env::from_process()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let outcome = match command {
        Command::List { queue, limit } => {
            dlq::list(&settings, &queue, limit).await.map(|letters| {
                for letter in letters {
                    println!("{}", serde_json::to_string(&letter).unwrap_or_default());
                }
            })
        }
        Command::Redrive { queue, limit } => dlq::redrive(&settings, &queue, limit)
            .await
            .map(|moved| println!("moved {moved} message(s) from {queue}.dlq back to {queue}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlq: {error}");
            ExitCode::FAILURE
        }
    }
}
