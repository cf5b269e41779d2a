# One image for the init container (palisade-init: `python -m firewall redirect apply`),
# the sidecar (`python -m firewall run`) and the webhook (`python -m injector serve`).
# Not built in this repository's CI (no Docker engine there); kept simple enough to check by reading.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PALISADE_DLP_RULES=/usr/share/palisade/dlp_rules \
    XDG_CACHE_HOME=/var/run/palisade/cache

# nftables + iproute2: redirect rules; libpcap: BPF filter compilation for captures;
# gcc only while building wheels that have no binary for this platform, then removed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 libpcap0.8 libcap2-bin tar ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/palisade
COPY pyproject.toml README.md ./
COPY firewall ./firewall
COPY injector ./injector
RUN pip install --no-compile . && rm -rf /root/.cache
COPY dlp_rules /usr/share/palisade/dlp_rules

# Kubernetes gives a non-root container no ambient capabilities: the sidecar (UID 1337) gets
# CAP_NET_ADMIN (IP_TRANSPARENT, SO_MARK) and CAP_NET_RAW (captures) from file capabilities on
# the interpreter; the pod must list both in capabilities.add (the injector does) and allow
# privilege escalation for file capabilities to apply. The webhook runs with no capabilities.
RUN setcap cap_net_admin,cap_net_raw+ep "$(readlink -f /usr/local/bin/python3)"

# Default sidecar config (the injector points --config here); every key is documented in docs/sre.md.
RUN mkdir -p /etc/palisade \
 && printf 'idle_timeout: 3600\ndrain_timeout: 20\nreload_interval: 2\n' > /etc/palisade/config.yaml

# UID/GID 1337: the redirect rules never capture this user's traffic (no loops).
RUN groupadd --gid 1337 palisade \
 && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin palisade \
 && mkdir -p /var/run/palisade/pcap /var/run/palisade/cache \
 && chown -R 1337:1337 /var/run/palisade

USER 1337:1337
EXPOSE 15006 15001 15020 8443
ENTRYPOINT ["python", "-m"]
CMD ["firewall", "--help"]
