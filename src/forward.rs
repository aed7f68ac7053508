//! The byte splice between two streams: both directions at once, a FIN in one direction is
//! passed on while the other keeps flowing, and the byte counts come back when both are done.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer size per direction.
const BUF_SIZE: usize = 16 * 1024;

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the first stream to the second.
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// Copies both ways until both directions have seen EOF (each EOF is forwarded as a
/// shutdown of the other side's write half) or an error occurs.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, BUF_SIZE, BUF_SIZE).await?;
    Ok(Transferred { a_to_b, b_to_a })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn half_close_is_forwarded_and_the_other_direction_keeps_flowing() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b).await });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "server sees the data, then EOF");

        server
            .write_all(b"response after client FIN")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after client FIN");

        let t = task.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                a_to_b: 7,
                b_to_a: 25
            }
        );
    }
}
