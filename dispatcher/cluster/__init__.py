"""Cluster mode: what the processes of one deployment share through Redis (`[cluster].redis_url`).

```python
async with open_cluster(settings) as cluster:
    bucket = cluster.bucket("sms", rate=100, burst=5)   # TokenBucket's interface, cluster-wide
    await bucket.acquire()                              # RateLimitUnavailable when Redis is away
    ready = await cluster.ping()
```
"""

from __future__ import annotations

from .limiter import BucketStats, ClusterBucket, RateLimitUnavailable, Reservation
from .redis import Cluster, open_cluster

__all__ = ["BucketStats", "Cluster", "ClusterBucket", "RateLimitUnavailable", "Reservation", "open_cluster"]
