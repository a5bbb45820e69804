// Adobe's own client as a peer: @adobe/jwt-auth exchanges a JWT, as an AEM integration does.
//
//   node peer_jwt_auth.js --credentials AEM.json --ims http://127.0.0.1:PORT --out FILE
//        [--loop SECONDS [--cycles N]] [--urlencoded]
//
// The library is used as published: it reads `ims` as the IMS base URL, builds `aud`
// and the metascope claims from it, signs RS256 with jsonwebtoken and POSTs to
// `${ims}/ims/exchange/jwt/` with node-fetch. The token is then written atomically
// (temp file, fsync, rename), like bench/floor.py does. One line per published token
// on stdout (`published N`), which bench/run.py counts.
//
// --urlencoded: the library sends its form as multipart/form-data, which Adobe IMS
// accepts. Where the IMS emulator does not, this swaps the library's `form-data`
// dependency for an application/x-www-form-urlencoded body with the same fields;
// everything else (claims, signing, HTTP stack, parsing) stays the library's.
'use strict';

const fs = require('fs');
const path = require('path');
const Module = require('module');

function parseArgs(argv) {
  const args = { loop: null, cycles: null, urlencoded: false };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    if (name === '--urlencoded') {
      args.urlencoded = true;
    } else if (['--credentials', '--ims', '--out', '--loop', '--cycles'].includes(name)) {
      args[name.slice(2)] = argv[++i];
    } else {
      throw new Error(`unknown argument ${name}`);
    }
  }
  if (!args.credentials || !args.ims || !args.out) {
    throw new Error('--credentials, --ims and --out are required');
  }
  return args;
}

function useUrlencodedForm() {
  // Resolve form-data the way the library does, then pre-load our stand-in there.
  const library = path.dirname(require.resolve('@adobe/jwt-auth/package.json'));
  const formData = require.resolve('form-data', { paths: [library] });
  class UrlencodedForm extends URLSearchParams {
    getHeaders() {
      return { 'content-type': 'application/x-www-form-urlencoded' };
    }
  }
  const stub = new Module(formData);
  stub.filename = formData;
  stub.loaded = true;
  stub.exports = UrlencodedForm;
  require.cache[formData] = stub;
}

function publish(file, token) {
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, 'w', 0o440);
  try {
    fs.writeSync(fd, token);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.urlencoded) {
    useUrlencodedForm();
  }
  const authorize = require('@adobe/jwt-auth');
  let count = 0;
  for (;;) {
    // Re-read every time, as a sidecar must (the mounted Secret may be rotated).
    const document = JSON.parse(fs.readFileSync(args.credentials, 'utf8'));
    const integration = document.integration || document;
    const answer = await authorize({
      clientId: integration.technicalAccount.clientId,
      clientSecret: integration.technicalAccount.clientSecret,
      technicalAccountId: integration.id,
      orgId: integration.org,
      privateKey: integration.privateKey,
      metaScopes: integration.metascopes,
      ims: args.ims.replace(/\/+$/, ''),
    });
    publish(args.out, answer.access_token);
    count += 1;
    process.stdout.write(`published ${count}\n`);
    if (args.loop === null || (args.cycles !== null && count >= Number(args.cycles))) {
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, Number(args.loop) * 1000));
  }
}

main().catch((error) => {
  process.stderr.write(`peer_jwt_auth: ${error.code || 'error'}: ${error.message}\n`);
  process.exit(1);
});
