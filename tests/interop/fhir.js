#!/usr/bin/env node
'use strict';
// A real FHIR server (@asymmetrik/node-fhir-server-core) for tower-fhir's
// interop tests: DSTU2 (/1_0_2), STU3 (/3_0_1) and R4 (/4_0_0) from one
// process, no auth, an in-memory store seeded with a few records.
//
//   node fhir.js --port P [--name LABEL]
//
// Prints `READY http://127.0.0.1:<port>` on stdout once listening; exits on
// SIGTERM/SIGINT. Logs go to stderr.
const { randomUUID } = require('node:crypto');
const http = require('node:http');
const path = require('node:path');
const { parseArgs } = require('node:util');

const core = require('@asymmetrik/node-fhir-server-core');

const { Server, resolveSchema, loggers } = core;
const CORE_DIST = path.dirname(require.resolve('@asymmetrik/node-fhir-server-core'));

const VERSIONS = ['1_0_2', '3_0_1', '4_0_0'];

// ------------------------------------------------------------------ CLI
function usage(message) {
  process.stderr.write(`${message}\nusage: node fhir.js --port P [--name LABEL]\n`);
  process.exit(2);
}
let opts;
try {
  ({ values: opts } = parseArgs({
    options: { port: { type: 'string' }, name: { type: 'string', default: 'fhir' } },
    strict: true,
  }));
} catch (err) {
  usage(err.message);
}
if (opts.port === undefined) usage('missing --port');
const PORT = Number(opts.port);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) usage(`bad --port ${opts.port}`);
const LABEL = opts.name;

// Set once listening: every URL this server builds (Bundle links, fullUrl,
// Location) is on http://127.0.0.1:<port>, whatever Host header came in.
let ORIGIN = null;
const baseUrl = (version) => `${ORIGIN}/${version}`;

// Logs to stderr only, so stdout carries just the READY line. Must exist
// before the Server is built (it then keeps this transport).
loggers.container.add('default', {
  transports: [new loggers.transports.Console({
    level: process.env.FHIR_LOG_LEVEL || 'warn',
    stderrLevels: ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'],
  })],
});

// ------------------------------------------------------------------ framework gaps
// node-fhir-server-core 2.2.5 ships the files for DSTU2 AllergyIntolerance,
// MedicationOrder and Conformance and STU3 AllergyIntolerance but leaves them
// out of its own index modules, so these profiles cannot be configured and
// DSTU2 /metadata fails ("Conformance is not a constructor"). Register the
// framework's own files under their keys.
function registerMissing(version, key, kinds) {
  for (const [kind, suffix] of kinds) {
    const dir = path.join(CORE_DIST, 'server/resources', version, kind);
    const index = require(dir);
    if (!index[key]) index[key] = require(path.join(dir, `${key}${suffix}`));
  }
}
const ALL_KINDS = [['controllers', '.controller.js'], ['parameters', '.parameters.js'], ['schemas', '.js']];
registerMissing('1_0_2', 'allergyintolerance', ALL_KINDS);
registerMissing('1_0_2', 'medicationorder', ALL_KINDS);
registerMissing('1_0_2', 'conformance', [['schemas', '.js']]);
registerMissing('3_0_1', 'allergyintolerance', ALL_KINDS);

// ------------------------------------------------------------------ seed data
const SEED_TIME = '2024-01-01T00:00:00.000Z';
const PATIENTS = [
  { id: 'p1', family: 'Smith', given: ['John', 'Q'], gender: 'male', birthDate: '1970-01-01', mrn: 'MRN-0001' },
  { id: 'p2', family: 'Smith', given: ['Jane'], gender: 'female', birthDate: '1982-05-17', mrn: 'MRN-0002' },
  { id: 'p3', family: 'Johnson', given: ['Robert'], gender: 'male', birthDate: '1955-11-30', mrn: 'MRN-0003' },
  { id: 'p4', family: 'Garcia', given: ['Maria'], gender: 'female', birthDate: '1990-07-04', mrn: 'MRN-0004' },
  { id: 'p5', family: 'Smith', given: ['Alex'], gender: 'other', birthDate: '2001-02-28', mrn: 'MRN-0005' },
];
const MRN_SYSTEM = 'http://tower-fhir.test/mrn';

function tags(version) {
  return [
    { system: 'urn:tower-fhir:interop:server', code: LABEL },
    { system: 'urn:tower-fhir:interop:fhir-release', code: version },
  ];
}

function meta(version) {
  return { versionId: '1', lastUpdated: SEED_TIME, tag: tags(version) };
}

const cc = (system, code, display) => ({ coding: [{ system, code, display }], text: display });

function seed(version) {
  const dstu2 = version === '1_0_2';
  const r4 = version === '4_0_0';
  const out = [];
  const add = (r) => out.push({ ...r, meta: meta(version) });
  const ref = (id) => ({ reference: `Patient/${id}` });

  for (const p of PATIENTS) {
    add({
      resourceType: 'Patient',
      id: p.id,
      identifier: [{ use: 'usual', system: MRN_SYSTEM, value: p.mrn }],
      active: true,
      name: [{ use: 'official', family: dstu2 ? [p.family] : p.family, given: p.given }],
      gender: p.gender,
      birthDate: p.birthDate,
    });
  }

  const catSystem = r4 ? 'http://terminology.hl7.org/CodeSystem/observation-category' : 'http://hl7.org/fhir/observation-category';
  const category = (code, display) => (dstu2 ? cc(catSystem, code, display) : [cc(catSystem, code, display)]);
  const obs = (id, patient, date, cat, code, display, value, unit, ucumCode) => add({
    resourceType: 'Observation',
    id,
    status: 'final',
    category: category(cat, cat === 'vital-signs' ? 'Vital Signs' : 'Laboratory'),
    code: cc('http://loinc.org', code, display),
    subject: ref(patient),
    effectiveDateTime: date,
    valueQuantity: { value, unit, system: 'http://unitsofmeasure.org', code: ucumCode },
  });
  PATIENTS.forEach((p, i) => {
    obs(`obs-${p.id}-hr-1`, p.id, `2023-0${i + 1}-10T09:00:00Z`, 'vital-signs', '8867-4', 'Heart rate', 60 + i, 'beats/minute', '/min');
    obs(`obs-${p.id}-hr-2`, p.id, `2024-0${i + 1}-12T09:00:00Z`, 'vital-signs', '8867-4', 'Heart rate', 70 + i, 'beats/minute', '/min');
    obs(`obs-${p.id}-wt-1`, p.id, `2023-0${i + 1}-20T09:00:00Z`, 'vital-signs', '29463-7', 'Body weight', 70 + i * 2, 'kg', 'kg');
    obs(`obs-${p.id}-glu-1`, p.id, `2024-0${i + 1}-15T09:00:00Z`, 'laboratory', '2339-0', 'Glucose', 90 + i, 'mg/dL', 'mg/dL');
  });

  const conditionBase = (id, patient, code, display, date) => {
    if (dstu2) {
      return {
        resourceType: 'Condition', id, patient: ref(patient), code: cc('http://snomed.info/sct', code, display),
        clinicalStatus: 'active', verificationStatus: 'confirmed', dateRecorded: date.slice(0, 10), onsetDateTime: date,
      };
    }
    if (r4) {
      return {
        resourceType: 'Condition', id, subject: ref(patient), code: cc('http://snomed.info/sct', code, display),
        clinicalStatus: cc('http://terminology.hl7.org/CodeSystem/condition-clinical', 'active', 'Active'),
        verificationStatus: cc('http://terminology.hl7.org/CodeSystem/condition-ver-status', 'confirmed', 'Confirmed'),
        onsetDateTime: date, recordedDate: date,
      };
    }
    return {
      resourceType: 'Condition', id, subject: ref(patient), code: cc('http://snomed.info/sct', code, display),
      clinicalStatus: 'active', verificationStatus: 'confirmed', onsetDateTime: date, assertedDate: date,
    };
  };
  add(conditionBase('cond-p1-1', 'p1', '44054006', 'Diabetes mellitus type 2', '2015-03-01T00:00:00Z'));
  add(conditionBase('cond-p1-2', 'p1', '38341003', 'Hypertension', '2018-06-01T00:00:00Z'));
  add(conditionBase('cond-p2-1', 'p2', '195967001', 'Asthma', '2010-09-01T00:00:00Z'));

  const encounter = (id, patient, start, end) => {
    const period = { start, end };
    if (dstu2) {
      return { resourceType: 'Encounter', id, status: 'finished', class: 'outpatient', patient: ref(patient), period };
    }
    const klass = r4
      ? { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB', display: 'ambulatory' }
      : { system: 'http://hl7.org/fhir/v3/ActCode', code: 'AMB', display: 'ambulatory' };
    return { resourceType: 'Encounter', id, status: 'finished', class: klass, subject: ref(patient), period };
  };
  add(encounter('enc-p1-1', 'p1', '2021-04-01T10:00:00Z', '2021-04-01T10:30:00Z'));
  add(encounter('enc-p1-2', 'p1', '2023-11-15T14:00:00Z', '2023-11-15T14:45:00Z'));
  add(encounter('enc-p1-3', 'p1', '2022-08-20T08:00:00Z', '2022-08-20T08:20:00Z'));
  add(encounter('enc-p2-1', 'p2', '2022-02-02T09:00:00Z', '2022-02-02T09:15:00Z'));

  const substance = cc('http://snomed.info/sct', '227493005', 'Cashew nuts');
  if (dstu2) {
    add({ resourceType: 'AllergyIntolerance', id: 'allergy-p1-1', patient: ref('p1'), substance, status: 'active', criticality: 'CRITH', recordedDate: '2019-05-05' });
  } else if (r4) {
    add({
      resourceType: 'AllergyIntolerance', id: 'allergy-p1-1', patient: ref('p1'), code: substance, criticality: 'high',
      clinicalStatus: cc('http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical', 'active', 'Active'),
      verificationStatus: cc('http://terminology.hl7.org/CodeSystem/allergyintolerance-verification', 'confirmed', 'Confirmed'),
      recordedDate: '2019-05-05',
    });
  } else {
    add({
      resourceType: 'AllergyIntolerance', id: 'allergy-p1-1', patient: ref('p1'), code: substance, criticality: 'high',
      clinicalStatus: 'active', verificationStatus: 'confirmed', assertedDate: '2019-05-05',
    });
  }

  const payor = { display: 'Acme Health Insurance' };
  if (dstu2) {
    add({ resourceType: 'Coverage', id: 'cov-p1-1', issuer: payor, subscriber: ref('p1'), subscriberId: 'SUB-0001', plan: 'GOLD', period: { start: '2024-01-01' } });
    add({ resourceType: 'Coverage', id: 'cov-p2-1', issuer: payor, subscriber: ref('p2'), subscriberId: 'SUB-0002', plan: 'SILVER', period: { start: '2024-01-01' } });
  } else {
    for (const [id, p, sub] of [['cov-p1-1', 'p1', 'SUB-0001'], ['cov-p2-1', 'p2', 'SUB-0002']]) {
      add({
        resourceType: 'Coverage', id, status: 'active', subscriber: ref(p), subscriberId: sub, beneficiary: ref(p),
        payor: [payor], period: { start: '2024-01-01' },
      });
    }
  }

  const med = cc('http://www.nlm.nih.gov/research/umls/rxnorm', '860975', 'Metformin 500 MG Oral Tablet');
  const med2 = cc('http://www.nlm.nih.gov/research/umls/rxnorm', '314076', 'Lisinopril 10 MG Oral Tablet');
  for (const [id, m, date] of [['med-p1-1', med, '2015-03-02'], ['med-p1-2', med2, '2018-06-02']]) {
    if (dstu2) {
      add({ resourceType: 'MedicationOrder', id, status: 'active', patient: ref('p1'), dateWritten: date, medicationCodeableConcept: m, dosageInstruction: [{ text: 'once daily' }] });
    } else {
      add({ resourceType: 'MedicationRequest', id, status: 'active', intent: 'order', subject: ref('p1'), authoredOn: date, medicationCodeableConcept: m, dosageInstruction: [{ text: 'once daily' }] });
    }
  }
  return out;
}

// store[version][resourceType] = Map(id -> resource)
const store = {};
for (const version of VERSIONS) {
  store[version] = {};
  for (const r of seed(version)) {
    (store[version][r.resourceType] ||= new Map()).set(r.id, r);
  }
}

// ------------------------------------------------------------------ search helpers
const asArray = (v) => (v === undefined || v === null ? [] : Array.isArray(v) ? v : [v]);
const lower = (s) => String(s).toLowerCase();

function codings(concepts) {
  return asArray(concepts).flatMap((c) => asArray(c && c.coding));
}

function tokenMatch(value, concepts) {
  const [system, code] = value.includes('|') ? value.split('|', 2) : [undefined, value];
  return codings(concepts).some((c) => (system === undefined || (system === '' ? !c.system : c.system === system))
    && (code === '' || c.code === code));
}

function identifierMatch(value, identifiers) {
  const [system, code] = value.includes('|') ? value.split('|', 2) : [undefined, value];
  return asArray(identifiers).some((i) => (system === undefined || (system === '' ? !i.system : i.system === system))
    && (code === '' || i.value === code));
}

function refMatch(value, references) {
  const want = String(value).replace(/^.*?(Patient\/)?([^/]+)$/, '$2');
  return asArray(references).some((r) => r && typeof r.reference === 'string'
    && r.reference.replace(/^.*\/([^/]+)$/, '$1') === want);
}

// FHIR date prefixes on the lexical form, which is good enough for the seed data.
function dateMatch(value, date) {
  if (!date) return false;
  const m = /^(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.*)$/.exec(value);
  const prefix = m[1] || 'eq';
  const want = m[2];
  const have = String(date).slice(0, want.length);
  switch (prefix) {
    case 'eq': case 'ap': return have === want;
    case 'ne': return have !== want;
    case 'gt': case 'sa': return have > want;
    case 'lt': case 'eb': return have < want;
    case 'ge': return have >= want;
    case 'le': return have <= want;
    default: return false;
  }
}

function stringMatch(value, candidates, exact) {
  return asArray(candidates).flat().some((c) => c !== undefined && c !== null
    && (exact ? String(c) === value : lower(c).startsWith(lower(value))));
}

function patientRefs(r) {
  // DSTU2 Coverage has no patient search parameter; subscriber stands in.
  return [r.patient, r.subject, r.beneficiary, r.resourceType === 'Coverage' ? r.subscriber : undefined];
}

function dateOf(r) {
  switch (r.resourceType) {
    case 'Observation': return r.effectiveDateTime || (r.effectivePeriod && r.effectivePeriod.start);
    case 'Encounter': return r.period && r.period.start;
    case 'Condition': return r.recordedDate || r.assertedDate || r.dateRecorded || r.onsetDateTime;
    case 'AllergyIntolerance': return r.recordedDate || r.assertedDate || r.onsetDateTime;
    case 'MedicationOrder': return r.dateWritten;
    case 'MedicationRequest': return r.authoredOn;
    case 'Coverage': return r.period && r.period.start;
    default: return r.meta && r.meta.lastUpdated;
  }
}

const RESULT_PARAMS = ['_count', '_sort', '_getpagesoffset'];

// Returns a predicate for one search parameter (name may carry a modifier),
// or null for a parameter this store does not evaluate (ignored, as FHIR allows).
function predicate(name, value) {
  const [param, modifier] = name.split(':');
  const v = String(value);
  const values = v.split(','); // comma = OR
  const any = (f) => (r) => values.some((x) => f(r, x));
  switch (param) {
    case '_id': return any((r, x) => r.id === x);
    case '_lastUpdated': return any((r, x) => dateMatch(x, r.meta && r.meta.lastUpdated));
    case 'patient': case 'subject': case 'beneficiary': case 'subscriber':
      return any((r, x) => refMatch(x, param === 'patient' ? patientRefs(r) : r[param]));
    case 'family': return any((r, x) => stringMatch(x, asArray(r.name).map((n) => n.family), modifier === 'exact'));
    case 'given': return any((r, x) => stringMatch(x, asArray(r.name).map((n) => n.given), modifier === 'exact'));
    case 'name': return any((r, x) => stringMatch(x, asArray(r.name).flatMap((n) => [n.family, n.given, n.text]), modifier === 'exact'));
    case 'birthdate': return any((r, x) => dateMatch(x, r.birthDate));
    case 'gender': return any((r, x) => r.gender === x);
    case 'active': return any((r, x) => String(r.active) === x);
    case 'identifier': return any((r, x) => identifierMatch(x, r.identifier));
    case 'category': return any((r, x) => tokenMatch(x, r.category));
    case 'code': return any((r, x) => tokenMatch(x, r.code || r.substance || r.medicationCodeableConcept));
    case 'status': return any((r, x) => r.status === x);
    case 'date': case 'authoredon': case 'datewritten':
      return (r) => values.every((x) => dateMatch(x, dateOf(r)));
    default: return null;
  }
}

function sortKey(r, field) {
  switch (field) {
    case '_id': return r.id;
    case '_lastUpdated': return r.meta && r.meta.lastUpdated;
    case 'birthdate': return r.birthDate;
    case 'family': { const f = asArray(r.name)[0] && asArray(r.name)[0].family; return Array.isArray(f) ? f[0] : f; }
    case 'given': return asArray(r.name)[0] && asArray(asArray(r.name)[0].given)[0];
    default: return dateOf(r);
  }
}

// `_sort=-date,family` (STU3+) and `_sort:desc=date` / `_sort:asc=date` (DSTU2).
function sorter(args) {
  const keys = [];
  for (const [name, value] of Object.entries(args)) {
    const [param, modifier] = name.split(':');
    if (param !== '_sort') continue;
    for (let field of String(value).split(',').filter(Boolean)) {
      let desc = modifier === 'desc';
      if (field.startsWith('-')) { desc = true; field = field.slice(1); }
      keys.push({ field, desc });
    }
  }
  return (a, b) => {
    for (const { field, desc } of keys) {
      const x = sortKey(a, field); const y = sortKey(b, field);
      if (x === y) continue;
      if (x === undefined) return 1;
      if (y === undefined) return -1;
      return (x < y ? -1 : 1) * (desc ? -1 : 1);
    }
    return 0;
  };
}

function outcome(version, status, code, diagnostics) {
  const OperationOutcome = resolveSchema(version, 'operationoutcome');
  return new OperationOutcome({ statusCode: status, issue: [{ severity: 'error', code, diagnostics }] });
}

function searchUrl(version, resourceType, args, offset) {
  const enc = (x) => encodeURIComponent(x).replace(/%3A/gi, ':').replace(/%2C/gi, ',').replace(/%7C/gi, '|');
  const parts = [];
  for (const [k, v] of Object.entries(args)) {
    if (k === 'base_version' || k === '_getpagesoffset') continue;
    for (const x of asArray(v)) parts.push(`${enc(k)}=${enc(String(x))}`);
  }
  if (offset) parts.push(`_getpagesoffset=${offset}`);
  return `${baseUrl(version)}/${resourceType}${parts.length ? `?${parts.join('&')}` : ''}`;
}

// ------------------------------------------------------------------ services
function makeService(resourceType) {
  const table = (version) => (store[version][resourceType] ||= new Map());

  return {
    // args are the framework's sanitized arguments: the declared search
    // parameters (see searchParamsModule below) plus base_version.
    search: async (args) => {
      const version = args.base_version;
      const preds = [];
      for (const [name, value] of Object.entries(args)) {
        if (name === 'base_version' || RESULT_PARAMS.includes(name.split(':')[0])) continue;
        const p = predicate(name, value);
        if (p) preds.push(p);
      }
      const matches = [...table(version).values()].filter((r) => preds.every((p) => p(r)));
      matches.sort(sorter(args));

      const count = args._count !== undefined ? Math.max(0, Math.floor(args._count)) : 50;
      const offset = args._getpagesoffset !== undefined ? Math.max(0, Math.floor(args._getpagesoffset)) : 0;
      const page = matches.slice(offset, offset + count);

      const link = [{ relation: 'self', url: searchUrl(version, resourceType, args, offset) }];
      if (offset + count < matches.length && count > 0) {
        link.push({ relation: 'next', url: searchUrl(version, resourceType, args, offset + count) });
      }
      if (offset > 0) {
        link.push({ relation: 'previous', url: searchUrl(version, resourceType, args, Math.max(0, offset - count)) });
      }
      const Bundle = resolveSchema(version, 'bundle');
      return new Bundle({
        id: randomUUID(),
        meta: { lastUpdated: new Date().toISOString() },
        type: 'searchset',
        total: matches.length,
        link,
        entry: page.map((resource) => ({
          fullUrl: `${baseUrl(version)}/${resourceType}/${resource.id}`,
          resource,
          search: { mode: 'match' },
        })),
      });
    },

    searchById: async (args) => {
      const resource = table(args.base_version).get(args.id);
      if (!resource) {
        throw outcome(args.base_version, 404, 'not-found', `${resourceType}/${args.id} is not known`);
      }
      return resource;
    },

    // The framework answers 201 with Location (made absolute below) and,
    // from resource_version, ETag and an absolute Content-Location.
    create: async (args, { req }) => {
      const version = args.base_version;
      const body = req.body;
      if (!body || body.resourceType !== resourceType) {
        throw outcome(version, 400, 'invalid', `expected a ${resourceType} resource as application/fhir+json or application/json+fhir`);
      }
      const id = randomUUID();
      const resource = { ...body, id, meta: { ...(body.meta || {}), versionId: '1', lastUpdated: new Date().toISOString(), tag: tags(version) } };
      table(version).set(id, resource);
      return { id, resource_version: '1' };
    },

    update: async (args, { req }) => {
      const version = args.base_version;
      const body = req.body;
      if (!body || body.resourceType !== resourceType) {
        throw outcome(version, 400, 'invalid', `expected a ${resourceType} resource as application/fhir+json or application/json+fhir`);
      }
      if (body.id !== undefined && body.id !== args.id) {
        throw outcome(version, 400, 'invalid', `resource id ${body.id} does not match URL id ${args.id}`);
      }
      const previous = table(version).get(args.id);
      const versionId = previous ? String(Number(previous.meta.versionId) + 1) : '1';
      const resource = { ...body, id: args.id, meta: { ...(body.meta || {}), versionId, lastUpdated: new Date().toISOString(), tag: tags(version) } };
      table(version).set(args.id, resource);
      return { id: args.id, created: !previous, resource_version: versionId };
    },

    remove: async (args) => {
      table(args.base_version).delete(args.id);
      return {};
    },
  };
}

// ------------------------------------------------------------------ search parameters
// The framework keeps only the declared search parameters of a resource
// (req.sanitized_args). A profile's `metadata` module is its hook to declare
// them: here, the framework's own list for the resource plus the result
// parameters _count, _sort and _getpagesoffset (the paging cursor), and a
// `patient` parameter for DSTU2/STU3 Coverage, which the spec lacks there.
// The same module feeds the CapabilityStatement, without the result parameters.
const SEARCH_PARAMS_MODULE = path.join(__dirname, 'fhir-search-params.js');

const PROFILES = {
  Patient: VERSIONS,
  Observation: VERSIONS,
  Condition: VERSIONS,
  Encounter: VERSIONS,
  AllergyIntolerance: VERSIONS,
  Coverage: VERSIONS,
  MedicationOrder: ['1_0_2'],
  MedicationRequest: ['3_0_1', '4_0_0'],
};

const profiles = {};
for (const [name, versions] of Object.entries(PROFILES)) {
  profiles[name] = { service: makeService(name), versions, metadata: SEARCH_PARAMS_MODULE };
}

// ------------------------------------------------------------------ server
const fhirServer = new Server({
  profiles,
  server: { port: PORT || 1, corsOptions: { maxAge: 86400 } },
  logging: { level: 'warn' },
});
fhirServer
  .configureMiddleware()
  .configureSession()
  .configureHelmet()
  .configurePassport()
  .setPublicDirectory();

// The framework's create/update handlers set Location to a relative
// `<version>/<Type>/<id>`; make it this server's absolute URL.
fhirServer.app.use((req, res, next) => {
  const setHeader = res.setHeader;
  res.setHeader = function setHeaderAbsoluteLocation(name, value) {
    if (String(name).toLowerCase() === 'location' && typeof value === 'string' && !/^[a-z][a-z0-9+.-]*:/i.test(value)) {
      value = `${ORIGIN}/${value.replace(/^\/+/, '')}`;
    }
    return setHeader.call(this, name, value);
  };
  next();
});

fhirServer.setProfileRoutes();

// Batch. node-fhir-server-core 2.2.5 never mounts its base (batch/transaction)
// routes: router.enableBaseRoute reads `require('./base/base.config').length`
// while that module exports `{ routes }`, so POST [base] falls through to 404.
// Its base.service.batch, were it mounted, re-sends each entry over HTTP to
// the request's Host header and answers `type: batch` entries without
// resources. This handler instead replays each entry against this server's own
// framework routes (so every entry is served by node-fhir-server-core) and
// answers a `batch-response` Bundle.
fhirServer.app.post('/:base_version', async (req, res, next) => {
  const version = req.params.base_version;
  if (!VERSIONS.includes(version)) return next();
  const bundle = req.body;
  res.type(version === '1_0_2' ? 'application/json+fhir' : 'application/fhir+json');
  if (!bundle || bundle.resourceType !== 'Bundle' || !['batch', 'transaction'].includes(bundle.type)) {
    return res.status(400).json(outcome(version, 400, 'invalid', 'expected a Bundle of type batch as application/fhir+json or application/json+fhir'));
  }
  if (bundle.type === 'transaction') {
    return res.status(422).json(outcome(version, 422, 'not-supported', 'transaction is not supported; use batch'));
  }
  const contentType = version === '1_0_2' ? 'application/json+fhir' : 'application/fhir+json';
  const entries = await Promise.all(asArray(bundle.entry).map(async (entry) => {
    const request = entry.request || {};
    const method = String(request.method || 'GET').toUpperCase();
    const url = `${baseUrl(version)}/${String(request.url || '').replace(/^\/+/, '')}`;
    try {
      const response = await fetch(url, {
        method,
        headers: entry.resource ? { 'content-type': contentType } : {},
        body: entry.resource ? JSON.stringify(entry.resource) : undefined,
      });
      const text = await response.text();
      const out = { response: { status: `${response.status} ${http.STATUS_CODES[response.status] || ''}`.trim() } };
      const location = response.headers.get('location');
      if (location) out.response.location = location;
      // Version ETags only (express also puts content-hash ETags on any body).
      const etag = response.headers.get('etag');
      if (etag && /^(W\/"[^"]+"|\d+)$/.test(etag) && !/^W\/"[0-9a-f]+-/.test(etag)) {
        out.response.etag = etag.startsWith('W/') ? etag : `W/"${etag}"`;
      }
      if (text) {
        try {
          const json = JSON.parse(text);
          if (response.ok) out.resource = json;
          else out.response.outcome = json;
        } catch { /* non-JSON body: status only */ }
      }
      if (out.resource && out.resource.resourceType !== 'Bundle' && out.resource.id) {
        out.fullUrl = `${baseUrl(version)}/${out.resource.resourceType}/${out.resource.id}`;
      }
      return out;
    } catch (err) {
      return { response: { status: '500 Internal Server Error', outcome: outcome(version, 500, 'exception', err.message) } };
    }
  }));
  const Bundle = resolveSchema(version, 'bundle');
  return res.status(200).json(new Bundle({
    id: randomUUID(),
    meta: { lastUpdated: new Date().toISOString() },
    type: 'batch-response',
    link: [{ relation: 'self', url: baseUrl(version) }],
    entry: entries,
  }));
});

fhirServer.setErrorRoutes();

const httpServer = http.createServer(fhirServer.app);
httpServer.listen(PORT, '127.0.0.1', () => {
  ORIGIN = `http://127.0.0.1:${httpServer.address().port}`;
  process.stdout.write(`READY ${ORIGIN}\n`);
});
httpServer.on('error', (err) => {
  process.stderr.write(`fhir.js: ${err.message}\n`);
  process.exit(1);
});

function shutdown() {
  httpServer.close(() => process.exit(0));
  httpServer.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
