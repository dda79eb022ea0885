# Sourced by the benchmark scripts once a replica answers on $API (the REST base URL) with the
# admin token in data/admin-token: a product and a cohort, and a manufacturing CA
# (mfg-ca.pem/.key) registered with proof of possession to provision into them. Needs DC (the
# device-client binary); sets H, J, PRODUCT, COHORT.
H="Authorization: Bearer $(cat data/admin-token)"; J='content-type: application/json'
PRODUCT=$(curl -s -H "$H" -H "$J" -d '{"name":"thermostat"}' $API/products | jq -r .id)
COHORT=$(curl -s -H "$H" -H "$J" -d '{"name":"fleet"}' $API/products/$PRODUCT/cohorts | jq -r .id)
$DC pki ca --out-cert mfg-ca.pem --out-key mfg-ca.key --cn "Bench CA" 2> /dev/null
# Proof of possession: the CA signs a certificate whose CN is a fresh verification code.
CODE=$(curl -s -X POST -H "$H" $API/ca-certificates/verification-code | jq -r .code)
$DC pki device --ca-cert mfg-ca.pem --ca-key mfg-ca.key --id "$CODE" \
  --out-cert verify.pem --out-key verify.key --force 2> /dev/null
jq -n --rawfile pem mfg-ca.pem --rawfile proof verify.pem --arg p "$PRODUCT" --arg c "$COHORT" \
  '{certificate_pem: $pem, verification_certificate_pem: $proof, jitp: {product_id: $p, cohort_id: $c, tags: {}}}' \
  | curl -s -H "$H" -H "$J" --data @- $API/ca-certificates > /dev/null
