# Rotor: slim, non-root, runs the Slack bot (`rotor serve`).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY bot bot
COPY handlers handlers
COPY rotation rotation
COPY demo demo
# The same pins as `make` and CI (constraints.txt).
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11-slim
RUN groupadd --gid 10001 rotor && useradd --create-home --uid 10001 --gid 10001 rotor \
    && mkdir -p /etc/rotor /var/lib/rotor && chown rotor /var/lib/rotor
COPY --from=build /install /usr/local
WORKDIR /home/rotor
USER rotor
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 ROTOR_CONFIG=/etc/rotor/rotor.yml ROTOR_STATE=/var/lib/rotor/rotor.db PORT=3000
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz')"
ENTRYPOINT ["rotor"]
CMD ["serve"]
