'use strict';
// node-fhir-server-core `metadata` module for the profiles of fhir.js: it
// declares the search parameters the framework lets through to the service
// (req.sanitized_args) and lists them in the CapabilityStatement/Conformance.
//
// makeResource is called two ways by the framework:
// - by its router with `{ base_version, key }` (key lower-cased) to build the
//   sanitizer's whitelist;
// - by its metadata service with `Object.assign(base_version, { key })`, i.e.
//   a String object carrying `key`, for GET [base]/metadata.
const path = require('node:path');

const CORE_DIST = path.dirname(require.resolve('@asymmetrik/node-fhir-server-core'));

// Result parameters: accepted by the sanitizer, not listed as search parameters.
const RESULT_PARAMS = {
  _count: { type: 'number', description: 'Page size' },
  _sort: { type: 'string', description: 'Sort order (`_sort=-date` or DSTU2 `_sort:desc=date`)' },
  _getpagesoffset: { type: 'number', description: 'Paging cursor used in Bundle next/previous links' },
};

// Coverage has no `patient` search parameter before R4.
const EXTRA_PARAMS = {
  '1_0_2': { coverage: { patient: { type: 'reference', fhirtype: 'reference', description: 'Non-standard: the subscriber' } } },
  '3_0_1': { coverage: { patient: { type: 'reference', fhirtype: 'reference', description: 'Non-standard: the beneficiary' } } },
};

function frameworkParams(version, key) {
  const dir = path.join(CORE_DIST, 'server/resources', version, 'parameters');
  const own = require(path.join(dir, `${key}.parameters.js`));
  const common = require(path.join(dir, 'resource.parameters.js'));
  return { ...own, ...((EXTRA_PARAMS[version] || {})[key] || {}), ...common };
}

module.exports.makeResource = (args) => {
  const forRouter = typeof args.base_version === 'string';
  const version = forRouter ? args.base_version : String(args);
  const key = String(args.key).toLowerCase();
  const params = frameworkParams(version, key);
  const searchParam = Object.entries(params).map(([name, p]) => ({
    name,
    type: forRouter ? p.type : p.fhirtype || p.type,
    definition: p.definition,
    documentation: p.description,
  }));
  if (forRouter) {
    for (const [name, p] of Object.entries(RESULT_PARAMS)) searchParam.push({ name, type: p.type });
  }
  return {
    type: forRouter ? key : String(args.key),
    // R4 made CapabilityStatement.rest.resource.profile a canonical.
    profile: version === '4_0_0'
      ? `http://hl7.org/fhir/StructureDefinition/${String(args.key)}`
      : { reference: `http://hl7.org/fhir/StructureDefinition/${String(args.key)}` },
    conditionalDelete: 'not-supported',
    searchParam,
  };
};
