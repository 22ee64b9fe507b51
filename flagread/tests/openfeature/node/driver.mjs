// Drives a Node OpenFeature provider for the tests (flagread/tests/openfeature), unchanged and
// as an application would: @openfeature/server-sdk with @openfeature/flagd-provider (rpc) or
// @openfeature/ofrep-provider. Same JSON-lines protocol as ../python/driver.py (see there):
// config JSON as the first argument; prints {"ready", "ms", "error"?}, then events and one
// answer per command read from stdin.
import { createInterface } from 'node:readline';
import { OpenFeature, ProviderEvents } from '@openfeature/server-sdk';
import { FlagdProvider } from '@openfeature/flagd-provider';
import { OFREPProvider } from '@openfeature/ofrep-provider';

const config = JSON.parse(process.argv[2]);
const emit = (message) => process.stdout.write(JSON.stringify(message) + '\n');

function provider() {
  if (config.provider === 'flagd') {
    const options = { host: config.host, port: config.port, resolverType: 'rpc' };
    if (config.selector) options.selector = config.selector;
    if (config.deadlineMs) options.deadlineMs = config.deadlineMs;
    if (config.token) throw new Error('the Node flagd provider has no way to send an authorization header');
    return new FlagdProvider(options);
  }
  return new OFREPProvider({ baseUrl: config.baseUrl, headers: Object.entries(config.headers ?? {}) });
}

for (const event of Object.values(ProviderEvents)) {
  OpenFeature.addHandler(event, (details) => emit({ event, flags: details?.flagsChanged ?? null }));
}

const chosen = provider();
const started = performance.now();
try {
  await OpenFeature.setProviderAndWait(chosen);
  emit({ ready: true, ms: performance.now() - started });
} catch (error) {
  emit({ ready: false, ms: performance.now() - started, error: String(error?.message ?? error) });
}
const client = OpenFeature.getClient();

const methods = {
  boolean: 'getBooleanDetails',
  string: 'getStringDetails',
  integer: 'getNumberDetails',
  float: 'getNumberDetails',
  object: 'getObjectDetails',
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const command = JSON.parse(line);
  if (command.op === 'quit') break;
  const details = await client[methods[command.type]](command.key, command.default, command.context ?? {});
  emit({
    id: command.id,
    value: details.value,
    variant: details.variant ?? null,
    reason: details.reason ?? null,
    errorCode: details.errorCode ?? null,
    errorMessage: details.errorMessage ?? null,
    metadata: details.flagMetadata ?? {},
  });
}
await OpenFeature.close();
process.exit(0);
